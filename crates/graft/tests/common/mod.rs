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
        .args(["quickstart", "--prepare-only", "--eval-words", "4", "--out"])
        .arg(dir));
    dir.join("quickstart.toml")
}

/// `--set output.dir="DIR"`.
pub fn out_dir(dir: &Path) -> [String; 2] {
    ["--set".into(), format!("output.dir=\"{}\"", dir.display())]
}
