//! Shared helpers for integration tests over `../shared/data`.
#![allow(dead_code)]

use std::path::PathBuf;

/// `CARGO_MANIFEST_DIR/../../../shared/data`, or `None` (after printing why) when it is absent.
pub fn data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: shared data not found at {}", dir.display());
        None
    }
}

/// Reads and parses a JSON file.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON array of integers as ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The Qwen2.5 tokenizer and chat template, loaded once per test binary (building the BPE merges
/// from 151k ranks takes a moment).
pub fn qwen(data: &std::path::Path) -> &'static (graft_data::Tokenizer, Option<graft_data::ChatTemplate>) {
    static QWEN: std::sync::OnceLock<(graft_data::Tokenizer, Option<graft_data::ChatTemplate>)> =
        std::sync::OnceLock::new();
    QWEN.get_or_init(|| graft_data::load_tokenizer_and_template(&data.join("tokenizers/qwen2.5")).unwrap())
}
