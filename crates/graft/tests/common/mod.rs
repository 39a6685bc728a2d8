//! Helpers shared by the `graft` binary's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `graft` binary under test.
pub fn graft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_graft"))
}

/// A fresh, empty temporary directory for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("graft-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// stdout + stderr of a finished command.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, asserts success and returns its stdout + stderr.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("graft runs");
    let t = text(&out);
    assert!(out.status.success(), "command failed: {t}");
    t
}

/// Runs `cmd`, asserts failure and returns its stdout + stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("graft runs");
    let t = text(&out);
    assert!(!out.status.success(), "command should have failed: {t}");
    t
}

/// Writes the quickstart's model, data and config into `dir`; returns the config path.
pub fn prepare(dir: &Path) -> PathBuf {
    ok(graft()
        .args([
            "quickstart",
            "--toy",
            "--prepare-only",
            "--eval-words",
            "4",
            "--out",
        ])
        .arg(dir));
    dir.join("quickstart.toml")
}

/// `--set output.dir="DIR"`.
pub fn out_dir(dir: &Path) -> [String; 2] {
    ["--set".into(), format!("output.dir=\"{}\"", dir.display())]
}

/// Writes `n` preference pairs "reverse: w" → chosen "a" + reversed w, rejected "b" + reversed w
/// (TRL's conversational format): a preference a random model learns and carries to held-out
/// words. With `margin_every = Some(k)`, every k-th row has a `margin` column of 0.5.
#[allow(dead_code)]
pub fn write_reverse_pairs(path: &Path, n: usize, seed: u64, margin_every: Option<usize>) {
    let mut s = seed;
    let mut text = String::new();
    for i in 0..n {
        let len = 3 + (s % 4) as usize;
        let word: String = (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (b'a' + ((s >> 33) % 26) as u8) as char
            })
            .collect();
        let reversed: String = word.chars().rev().collect();
        let mut row = serde_json::json!({
            "prompt": [{"role": "user", "content": format!("reverse: {word}")}],
            "chosen": [{"role": "assistant", "content": format!("a{reversed}")}],
            "rejected": [{"role": "assistant", "content": format!("b{reversed}")}],
        });
        if margin_every.is_some_and(|k| i % k == 0) {
            row["margin"] = serde_json::json!(0.5);
        }
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// The JSON records of a `metrics.jsonl`.
#[allow(dead_code)]
pub fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
