//! A model in an Ollama store (manifest + `sha256-…` blob, no `.gguf` extension) opens like the
//! GGUF file it is: weights, tokenizer and chat template.

use std::path::{Path, PathBuf};

fn shared_gguf() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/models/stories260K/stories260K.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

#[test]
fn an_ollama_blob_opens_as_its_gguf() {
    let Some(src) = shared_gguf() else { return };
    let store = std::env::temp_dir().join(format!("graft-ollama-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let hex = "ab".repeat(32);
    std::fs::copy(&src, store.join(format!("blobs/sha256-{hex}"))).unwrap();
    let manifest = graft_hub::ollama::manifest_path(&store, "stories:260k").unwrap();
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(
        &manifest,
        serde_json::json!({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}")}
        ]})
        .to_string(),
    )
    .unwrap();
    let m = graft_hub::ollama::resolve_in(&store, "ollama:stories:260k").unwrap();
    let loaded = graft_model::weights::load_model(&m.gguf).unwrap();
    let direct = graft_model::weights::load_model(&src).unwrap();
    assert_eq!(loaded.spec, direct.spec);
    let (tok, _) = graft_hub::load_tokenizer(&loaded, None, "--tokenizer").unwrap();
    assert_eq!(tok.vocab_size(), direct.spec.vocab_size);
    let _ = std::fs::remove_dir_all(&store);
}
