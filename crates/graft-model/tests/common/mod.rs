//! Helpers shared by the GGUF fixture tests: the fixture reader, and the deterministic tensor
//! values the fixture scripts (`scripts/gen_gguf_{quantize,transformers}_fixture.py`) write with
//! the same formula.
#![allow(dead_code)]

use graft_model::weights::DType;
use serde_json::Value;
use std::path::Path;

/// A fixture JSON file, or `None` (reason printed) when it cannot be read.
pub fn read_fixture(path: &Path) -> Option<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("cases.json parses")),
        Err(e) => {
            eprintln!("skipping: {} not readable ({e})", path.display());
            None
        }
    }
}

/// FNV-1a, 64-bit (the scripts' checksum).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// The script's formula data for tensor `name`: `n` values in rows of `row`.
pub fn values(name: &str, n: usize, row: usize) -> Vec<f32> {
    let seed = fnv1a64(name.as_bytes());
    let mut v: Vec<f32> = (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let x = ((z >> 40) as i64 - (1 << 23)) as f32 * (2.0f32).powi(-27);
            if z & 0xFF == 0 { x * 16.0 } else { x }
        })
        .collect();
    if n >= 3 * row {
        v[row..row + 32].fill(0.0);
        v[2 * row..2 * row + 16].fill(1.0 / 32.0);
    }
    v
}

/// The graft type of a ggml type name.
pub fn dtype(name: &str) -> DType {
    DType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}
