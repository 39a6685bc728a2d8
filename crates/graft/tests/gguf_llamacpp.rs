//! GGUF exports run the same in llama.cpp as in graft, checked against llama.cpp itself
//! (llama-cpp-python built from PyPI, driven by `scripts/llamacpp_greedy.py`).
//!
//! - Every `--quant` of `graft export gguf` of SmolLM2-135M-Instruct: llama.cpp tokenizes the
//!   chat prompt as graft does; F32/F16/BF16 give llama.cpp's greedy tokens exactly; a quantized
//!   file gives them up to the step where llama.cpp's own quantized run leaves its F16 run (its
//!   dot products quantize activations) — checked teacher-forced on llama.cpp's tokens, so that a
//!   near tie (top-2 logits within 0.5 in graft) is not a failure.
//! - `graft export gguf-lora` and the merged export of a LoRA run on stories260K (a
//!   SentencePiece tokenizer from an HF folder): llama.cpp with `--lora` on the base, llama.cpp on
//!   the merged file, graft with the PEFT adapter and graft with the adapter GGUF read back give
//!   the same greedy tokens.
//!
//! Needs `../shared/data` and a Python with `llama_cpp` (`GRAFT_LLAMACPP_PYTHON`, default
//! `python3`); skips with the reason otherwise.

mod common;
use common::{graft, ok, tmp};
use std::path::{Path, PathBuf};
use std::process::Command;

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found (needs ../shared/data)", p.display());
        None
    }
}

/// The Python that has llama-cpp-python, or `None` (reason printed).
fn peer() -> Option<String> {
    let python = std::env::var("GRAFT_LLAMACPP_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "skipping: `{python}` cannot import llama_cpp (set GRAFT_LLAMACPP_PYTHON to a Python with \
             llama-cpp-python; see scripts/llamacpp_greedy.py)"
        );
        return None;
    }
    Some(python)
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llamacpp_greedy.py")
}

fn json_ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no `{key}` in {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn run_peer(python: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(script())
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A llama.cpp built for another CPU dies of SIGILL (4) with nothing printed: say so.
    use std::os::unix::process::ExitStatusExt;
    let signal = out
        .status
        .signal()
        .map(|s| format!(" (killed by signal {s})"))
        .unwrap_or_default();
    assert!(
        out.status.success(),
        "llama.cpp {args:?} failed: {}{signal}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// llama.cpp's greedy continuation of `ids`.
fn llama_greedy(python: &str, model: &Path, lora: Option<&Path>, ids: &[u32], n: usize) -> Vec<u32> {
    let m = model.to_string_lossy();
    let ids = ids_arg(ids);
    let n = n.to_string();
    let mut args = vec![m.as_ref(), "--ids", &ids, "--max-tokens", &n];
    let l;
    if let Some(p) = lora {
        l = p.to_string_lossy();
        args.extend(["--lora", l.as_ref()]);
    }
    json_ids(&run_peer(python, &args), "ids")
}

/// graft's exact greedy run: (prompt ids, generated ids).
fn graft_greedy(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    chat: bool,
    n: usize,
) -> (Vec<u32>, Vec<u32>) {
    let mut cmd = graft();
    cmd.args(["generate", "--exact", "--json", "--model"]).arg(model);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    if chat {
        cmd.arg("--chat");
    }
    cmd.args(["--prompt", prompt, "--max-tokens", &n.to_string()]);
    let text = ok(&mut cmd);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (json_ids(&v, "prompt_ids"), json_ids(&v, "ids"))
}

/// graft's exact logits at every position of `ids`.
fn graft_logits(model: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let out = graft()
        .args(["logits", "--model"])
        .arg(model)
        .args(["--ids", &ids_arg(ids)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[test]
fn exported_gguf_files_generate_as_in_llama_cpp() {
    let (Some(model), Some(python)) = (
        shared("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        peer(),
    ) else {
        return;
    };
    let root = tmp("gguf-llamacpp");
    let prompt = "Write one sentence about the sea.";
    let n = 24;
    let export = |q: &str| {
        let out = root.join(format!("smol-{q}.gguf"));
        ok(graft()
            .args(["export", "gguf"])
            .arg(&model)
            .args(["--quant", q, "--out"])
            .arg(&out));
        out
    };
    // The prompt as graft renders and tokenizes it; llama.cpp must tokenize the same text alike.
    let f16 = export("f16");
    let (prompt_ids, _) = graft_greedy(&f16, None, prompt, true, 1);
    let rendered = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                    <|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n";
    let peer_tok = json_ids(
        &run_peer(&python, &[&f16.to_string_lossy(), "--tokenize", rendered]),
        "prompt_ids",
    );
    assert_eq!(
        peer_tok, prompt_ids,
        "llama.cpp tokenizes the chat prompt differently"
    );
    let llama_f16 = llama_greedy(&python, &f16, None, &prompt_ids, n);
    assert!(llama_f16.len() >= 8, "{llama_f16:?}");

    for q in ["f32", "f16", "bf16"] {
        let file = export(q);
        let peer = llama_greedy(&python, &file, None, &prompt_ids, n);
        let (_, ours) = graft_greedy(&file, None, prompt, true, n);
        assert_eq!(ours, peer, "{q}: graft and llama.cpp differ");
    }
    for q in ["q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] {
        let file = export(q);
        let peer = llama_greedy(&python, &file, None, &prompt_ids, n);
        let k = common_prefix(&peer, &llama_f16);
        // Teacher-forced on llama.cpp's own tokens: graft's argmax is each of them, or a near tie.
        let mut seq = prompt_ids.clone();
        seq.extend_from_slice(&peer[..k]);
        let logits = graft_logits(&file, &seq);
        let mut ties = 0;
        for (i, &want) in peer[..k].iter().enumerate() {
            let row = &logits[prompt_ids.len() - 1 + i];
            let (best, max) = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |acc, (j, &x)| if x > acc.1 { (j, x) } else { acc });
            if best as u32 != want {
                let gap = max - row[want as usize];
                assert!(
                    gap < 0.5,
                    "{q}: step {i}: llama.cpp picks {want}, graft {best} by {gap:.3} logits (llama.cpp's {q} \
                     run agrees with its F16 run for {k} steps)"
                );
                ties += 1;
            }
        }
        eprintln!(
            "{q}: {k} steps where llama.cpp's {q} agrees with its F16 run; graft agrees on all ({ties} near ties)"
        );
    }
}

#[test]
fn lora_gguf_applies_in_llama_cpp_as_in_graft() {
    let (Some(model), Some(python)) = (shared("models/stories260K/hf"), peer()) else {
        return;
    };
    let root = tmp("gguf-lora-llamacpp");
    let line = "Once upon a time, there was a little dragon named Zorblax. Zorblax loved to fly.";
    let train: String = (0..40)
        .map(|_| serde_json::json!({"text": line}).to_string() + "\n")
        .collect();
    std::fs::write(root.join("train.jsonl"), train).unwrap();
    let run = root.join("run");
    let cfg = format!(
        "[model]\npath = \"{}\"\nprecision = \"exact\"\n[data]\ntrain = [\"{}\"]\nmax_length = 64\nmask = \"all\"\n\
         [lora]\nr = 8\nalpha = 16\ndropout = 0.0\n[optimizer]\nlr = 1e-2\n[batch]\nmicro_batch_tokens = 512\n\
         [train]\nmax_steps = 12\nsave_every = 0\n[output]\ndir = \"{}\"\n",
        model.display(),
        root.join("train.jsonl").display(),
        run.display()
    );
    std::fs::write(root.join("cfg.toml"), cfg).unwrap();
    ok(graft().arg("train").arg(root.join("cfg.toml")));

    let base_gguf = root.join("base.gguf");
    ok(graft()
        .args(["export", "gguf"])
        .arg(&model)
        .args(["--quant", "f32", "--out"])
        .arg(&base_gguf));
    let lora = root.join("adapter.gguf");
    ok(graft()
        .args(["export", "gguf-lora"])
        .arg(&run)
        .arg("--out")
        .arg(&lora));
    let merged = root.join("merged.gguf");
    ok(graft()
        .args(["export", "gguf"])
        .arg(&run)
        .args(["--quant", "f32", "--out"])
        .arg(&merged));

    let prompt = "Once upon a time, there was a";
    let peer_tok = json_ids(
        &run_peer(&python, &[&base_gguf.to_string_lossy(), "--tokenize", prompt]),
        "prompt_ids",
    );
    let (prompt_ids, base_ours) = graft_greedy(&model, None, prompt, false, 20);
    assert_eq!(
        peer_tok, prompt_ids,
        "llama.cpp tokenizes the exported SentencePiece vocabulary differently"
    );
    assert_eq!(
        llama_greedy(&python, &base_gguf, None, &prompt_ids, 20),
        base_ours,
        "base model"
    );

    let (_, tuned) = graft_greedy(&model, Some(&run.join("adapter")), prompt, false, 20);
    assert_ne!(
        tuned, base_ours,
        "the adapter should change the greedy continuation"
    );
    assert_eq!(
        llama_greedy(&python, &base_gguf, Some(&lora), &prompt_ids, 20),
        tuned,
        "llama.cpp with --lora"
    );
    assert_eq!(
        llama_greedy(&python, &merged, None, &prompt_ids, 20),
        tuned,
        "merged export"
    );
    // graft reads the llama.cpp adapter back (`--adapter FILE.gguf`) as the same adapter.
    let (_, from_gguf) = graft_greedy(&model, Some(&lora), prompt, false, 20);
    assert_eq!(from_gguf, tuned, "graft with --adapter adapter.gguf");
    let e = common::fails(
        graft()
            .args(["generate", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&base_gguf)
            .args(["--prompt", "x"]),
    );
    assert!(e.contains("not a LoRA adapter GGUF"), "{e}");
}

/// Without llama.cpp: an f32 export reads back into exactly the logits of its source (an HF
/// folder with a SentencePiece tokenizer, and a Q4_1 GGUF whose tokenizer keys are copied), and a
/// LoRA export carries llama.cpp's adapter keys.
#[test]
fn f32_exports_read_back_exactly() {
    let Some(hf) = shared("models/stories260K/hf") else {
        return;
    };
    let root = tmp("gguf-readback");
    let ids = [1u32, 403, 407, 261, 378, 432, 317];
    let out = root.join("st.gguf");
    ok(graft()
        .args(["export", "gguf"])
        .arg(&hf)
        .args(["--quant", "f32", "--out"])
        .arg(&out));
    assert_eq!(graft_logits(&out, &ids), graft_logits(&hf, &ids));
    let file = graft_model::weights::read_gguf(&out).unwrap();
    let get = |k: &str| file.metadata.get(k).cloned();
    use graft_model::weights::GgufValue as V;
    assert_eq!(get("general.architecture"), Some(V::String("llama".into())));
    assert_eq!(get("tokenizer.ggml.model"), Some(V::String("llama".into())));
    assert_eq!(get("general.file_type"), Some(V::U32(0)));

    let Some(smol) = shared("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let out = root.join("smol.gguf");
    ok(graft()
        .args(["export", "gguf"])
        .arg(&smol)
        .args(["--quant", "f32", "--out"])
        .arg(&out));
    let ids = [1u32, 9690, 198, 2683, 359, 253];
    assert_eq!(graft_logits(&out, &ids), graft_logits(&smol, &ids));
    let (a, b) = (
        graft_model::weights::read_gguf(&smol).unwrap(),
        graft_model::weights::read_gguf(&out).unwrap(),
    );
    for (k, v) in a.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
        assert_eq!(b.metadata.get(k), Some(v), "{k}");
    }
}

/// Bad export requests are errors that say what was expected (no `../shared` needed).
#[test]
fn export_errors_name_the_problem() {
    let root = tmp("gguf-errors");
    common::prepare(&root);
    let base = root.join("base-model");
    let e = common::fails(
        graft()
            .args(["export", "gguf"])
            .arg(&base)
            .args(["--quant", "q3_xl"]),
    );
    assert!(e.contains("--quant") && e.contains("q4_k_m"), "{e}");
    // The toy's character vocabulary is no kind llama.cpp runs: said so, and no file is left.
    let out = root.join("toy.gguf");
    let e = common::fails(graft().args(["export", "gguf"]).arg(&base).arg("--out").arg(&out));
    assert!(e.contains("tokenizer") && e.contains("byte-level"), "{e}");
    assert!(!out.exists());
    let e = common::fails(graft().args(["export", "gguf-lora"]).arg(&root));
    assert!(e.contains("run directory") && e.contains("config.toml"), "{e}");
}

/// `graft export ollama` on a ChatML model: the GGUF and a Modelfile with Ollama's template,
/// the end-of-turn stops and the template's default system prompt.
#[test]
fn ollama_export_writes_a_modelfile_for_the_chat_format() {
    let Some(smol) = shared("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let root = tmp("ollama-export");
    let dir = root.join("ollama");
    let text = ok(graft()
        .args(["export", "ollama"])
        .arg(&smol)
        .args(["--name", "smol-test", "--quant", "q8_0", "--out"])
        .arg(&dir)
        .env("PATH", ""));
    assert!(text.contains("ollama create smol-test"), "{text}");
    let m = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(m.starts_with("FROM ./model.gguf\n"), "{m}");
    assert!(
        m.contains("TEMPLATE \"\"\"{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n"),
        "{m}"
    );
    assert!(m.contains("{{ end }}<|im_start|>assistant\n\"\"\""), "{m}");
    assert!(m.contains("PARAMETER stop \"<|im_end|>\""), "{m}");
    assert!(
        m.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM, trained by Hugging Face\"\"\""),
        "{m}"
    );
    let file = graft_model::weights::read_gguf(&dir.join("model.gguf")).unwrap();
    assert_eq!(
        file.metadata.get("general.file_type"),
        Some(&graft_model::weights::GgufValue::U32(7))
    );
}
