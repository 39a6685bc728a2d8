//! `ollama:NAME[:TAG]` model paths: a model in Ollama's local store, opened from the GGUF blob
//! Ollama keeps for it (no copy, no network).
//!
//! ```text
//! $OLLAMA_MODELS (default ~/.ollama/models)
//! ├── manifests/{host}/{namespace}/{name}/{tag}   JSON: layers with media types and digests
//! └── blobs/sha256-{hex}                          layer contents (the model layer is a GGUF file)
//! ```
//!
//! A name is `[host/][namespace/]name[:tag]`; the defaults are `registry.ollama.ai`, `library`
//! and `latest`, as in `ollama pull`.

use graft_model::error::ModelError;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The prefix that marks an Ollama model path.
pub const PREFIX: &str = "ollama:";

/// A model in Ollama's store.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaModel {
    /// The manifest file it was resolved from.
    pub manifest: PathBuf,
    /// The model layer: a GGUF file.
    pub gguf: PathBuf,
    /// The `TEMPLATE` layer (a Go template), if any.
    pub template: Option<String>,
    /// The `SYSTEM` layer, if any.
    pub system: Option<String>,
    /// The `PARAMETER` layer (JSON: `stop`, `temperature`, …), if any.
    pub params: Option<Value>,
}

/// The store directory: `$OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn store_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OLLAMA_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".ollama").join("models")
}

/// The manifest path of `name` (without the `ollama:` prefix) in `store`.
pub fn manifest_path(store: &Path, name: &str) -> Result<PathBuf, String> {
    let (path, tag) = match name.rsplit_once(':') {
        // A `:` inside the host part (`host:port/ns/name`) is not a tag.
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") || tag.is_empty() || parts.len() > 3 {
        return Err(format!(
            "`{name}` is not an Ollama model name; expected [host/][namespace/]name[:tag], e.g. llama3.2:1b"
        ));
    }
    let (host, namespace, model) = match parts.as_slice() {
        [m] => ("registry.ollama.ai", "library", *m),
        [ns, m] => ("registry.ollama.ai", *ns, *m),
        [h, ns, m] => (*h, *ns, *m),
        _ => unreachable!("checked above"),
    };
    Ok(store
        .join("manifests")
        .join(host)
        .join(namespace)
        .join(model)
        .join(tag))
}

fn blob_path(store: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| store.join("blobs").join(format!("sha256-{hex}")))
}

/// Resolves `ollama:NAME[:TAG]` (or `NAME[:TAG]`) in the store of [`store_dir`].
pub fn resolve(spec: &str) -> Result<OllamaModel, ModelError> {
    resolve_in(&store_dir(), spec)
}

/// [`resolve`] in an explicit store directory.
pub fn resolve_in(store: &Path, spec: &str) -> Result<OllamaModel, ModelError> {
    let name = spec.strip_prefix(PREFIX).unwrap_or(spec);
    let manifest = manifest_path(store, name).map_err(|m| ModelError::format(Path::new(spec), m))?;
    if !manifest.is_file() {
        return Err(ModelError::format(
            &manifest,
            format!(
                "no Ollama model `{name}` in {} (run `ollama pull {name}`, or set OLLAMA_MODELS to the store)",
                store.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(&manifest).map_err(|e| ModelError::io(&manifest, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&manifest, format!("invalid JSON: {e}")))?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| ModelError::format(&manifest, "no `layers` list"))?;
    let mut out = OllamaModel {
        manifest: manifest.clone(),
        gguf: PathBuf::new(),
        template: None,
        system: None,
        params: None,
    };
    for (i, layer) in layers.iter().enumerate() {
        let media = layer.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
        let digest = layer.get("digest").and_then(|d| d.as_str()).unwrap_or("");
        let blob = blob_path(store, digest).ok_or_else(|| {
            ModelError::format(
                &manifest,
                format!("layers[{i}].digest: `{digest}` is not sha256:<64 hex>"),
            )
        })?;
        let read = || -> Result<String, ModelError> {
            std::fs::read_to_string(&blob).map_err(|e| ModelError::io(&blob, e))
        };
        match media.rsplit('.').next().unwrap_or("") {
            "model" => {
                if !blob.is_file() {
                    return Err(ModelError::format(
                        &blob,
                        format!(
                            "the model layer of `{name}` is missing from the store (re-run `ollama pull {name}`)"
                        ),
                    ));
                }
                out.gguf = blob;
            }
            "template" => out.template = Some(read()?),
            "system" => out.system = Some(read()?),
            "params" => {
                out.params =
                    Some(serde_json::from_str(&read()?).map_err(|e| {
                        ModelError::format(&blob, format!("the params layer is not JSON: {e}"))
                    })?)
            }
            "adapter" | "projector" => {
                return Err(ModelError::format(
                    &manifest,
                    format!(
                        "`{name}` has an {} layer; graft opens plain models only (merge the adapter first)",
                        media.rsplit('.').next().unwrap_or("")
                    ),
                ));
            }
            _ => {}
        }
    }
    if out.gguf.as_os_str().is_empty() {
        return Err(ModelError::format(
            &manifest,
            "no model layer (application/vnd.ollama.image.model)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn store(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("graft-ollama-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("blobs")).unwrap();
        d
    }

    #[test]
    fn names_map_to_manifest_paths() {
        let s = Path::new("/s");
        let m = |n: &str| manifest_path(s, n).unwrap();
        assert_eq!(
            m("llama3.2"),
            s.join("manifests/registry.ollama.ai/library/llama3.2/latest")
        );
        assert_eq!(
            m("llama3.2:1b"),
            s.join("manifests/registry.ollama.ai/library/llama3.2/1b")
        );
        assert_eq!(m("me/bot:v2"), s.join("manifests/registry.ollama.ai/me/bot/v2"));
        assert_eq!(m("host:5000/me/bot"), s.join("manifests/host:5000/me/bot/latest"));
        assert!(manifest_path(s, "../etc/passwd").is_err());
        assert!(manifest_path(s, "a/b/c/d").is_err());
    }

    #[test]
    fn manifest_layers_resolve_to_blobs_and_errors_name_the_place() {
        let st = store("m");
        let hex = DIGEST.trim_start_matches("sha256:");
        std::fs::write(st.join(format!("blobs/sha256-{hex}")), b"GGUF").unwrap();
        let t = "sha256:".to_string() + &"f".repeat(64);
        std::fs::write(
            st.join(format!("blobs/sha256-{}", "f".repeat(64))),
            "{{ .Prompt }}",
        )
        .unwrap();
        let manifest = manifest_path(&st, "tiny:q4").unwrap();
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::write(
            &manifest,
            serde_json::json!({"schemaVersion": 2, "layers": [
                {"mediaType": "application/vnd.ollama.image.model", "digest": DIGEST, "size": 4},
                {"mediaType": "application/vnd.ollama.image.template", "digest": t, "size": 13},
            ]})
            .to_string(),
        )
        .unwrap();
        let m = resolve_in(&st, "ollama:tiny:q4").unwrap();
        assert_eq!(m.gguf, st.join(format!("blobs/sha256-{hex}")));
        assert_eq!(m.template.as_deref(), Some("{{ .Prompt }}"));
        let e = resolve_in(&st, "ollama:other").unwrap_err().to_string();
        assert!(
            e.contains("no Ollama model `other`") && e.contains("ollama pull other"),
            "{e}"
        );
        std::fs::write(
            &manifest,
            serde_json::json!({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "md5:x"}]})
                .to_string(),
        )
        .unwrap();
        let e = resolve_in(&st, "tiny:q4").unwrap_err().to_string();
        assert!(e.contains("layers[0].digest"), "{e}");
        let _ = std::fs::remove_dir_all(&st);
    }
}
