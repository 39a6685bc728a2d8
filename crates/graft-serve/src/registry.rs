//! The adapter registry: name → resident LoRA adapter, loaded from PEFT directories at startup or
//! while serving, and unloaded without disturbing requests that already use it.
//!
//! Requests hold an `Arc` of the entry they resolved, so removing a name only stops new
//! requests from finding it; the tensors are freed when the last in-flight sequence ends.

use graft_kernels::Cpu;
use graft_model::lora::Adapter;
use graft_model::model::Model;
use graft_model::peft::{LoraAdapter, LoraAdapterConfig, LoraModule, load_peft_adapter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// One resident adapter.
pub struct AdapterEntry {
    /// The name requests use in `model`.
    pub name: String,
    /// The directory it was loaded from (canonical; never shown to clients).
    pub path: PathBuf,
    /// The device-side tensors.
    pub adapter: Adapter<Cpu>,
    /// Its PEFT config (rank, alpha, targets).
    pub config: LoraAdapterConfig,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// The project (API key) that loaded it and alone may use it; `None`: every client
    /// (adapters loaded at startup).
    pub owner: Option<String>,
}

impl AdapterEntry {
    /// Whether `project` may see and use this adapter.
    pub fn visible_to(&self, project: &str) -> bool {
        self.owner.as_deref().is_none_or(|o| o == project)
    }
}

/// Why an adapter could not be loaded or found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name does not match `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` or collides with the base.
    #[error("{0}")]
    InvalidName(String),
    /// The path (or a file in it) is not inside a configured adapter root, or does not exist.
    #[error("{0}")]
    Forbidden(String),
    /// An adapter with this name is already loaded.
    #[error("an adapter named `{0}` is already loaded; unload it first")]
    Exists(String),
    /// No adapter with this name.
    #[error("no adapter named `{0}` is loaded")]
    NotFound(String),
    /// The directory is not a loadable PEFT adapter for this model.
    #[error("{0}")]
    Load(String),
}

/// Loaded adapters and where they may be loaded from.
pub struct Registry {
    model: Arc<Model<Cpu>>,
    roots: Vec<PathBuf>,
    reserved: Vec<String>,
    adapters: RwLock<BTreeMap<String, Arc<AdapterEntry>>>,
}

/// Checks an adapter name: 1–64 characters of `A-Z a-z 0-9 . _ -`, starting alphanumeric.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid adapter name `{}`: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
            name.escape_debug()
        ))
    }
}

/// The files of a PEFT adapter directory that the loader reads.
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Refuses weights that are NaN or infinite, naming the first such tensor by its PEFT key.
fn check_finite(lora: &LoraAdapter) -> Result<(), String> {
    for (layer, l) in lora.layers.iter().enumerate() {
        for module in LoraModule::ALL {
            let Some(pair) = l.get(module) else {
                continue;
            };
            for (ab, values) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(format!(
                        "tensor `base_model.model.{}.{ab}.weight` holds {} at element {i}; the adapter is corrupt or diverged in training",
                        module.path(layer),
                        values[i]
                    ));
                }
            }
        }
    }
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    /// An empty registry for `model`; adapters may only be loaded from inside `roots` (which
    /// are canonicalised; roots that do not exist are dropped). `reserved` names (the base
    /// model's) cannot be used for adapters.
    pub fn new(model: Arc<Model<Cpu>>, roots: &[PathBuf], reserved: Vec<String>) -> Registry {
        let roots = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
        Registry {
            model,
            roots,
            reserved,
            adapters: RwLock::new(BTreeMap::new()),
        }
    }

    /// The canonical adapter roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether `canonical` (a canonical path) lies inside an adapter root.
    fn inside_roots(&self, canonical: &Path) -> bool {
        self.roots.iter().any(|r| canonical.starts_with(r))
    }

    /// Resolves a requested path: relative paths are tried inside each root first, then as
    /// given; the result must be a directory inside a root. A path that does not exist and one
    /// outside the roots get the same [`RegistryError::Forbidden`], so callers cannot probe
    /// which server paths exist.
    pub fn resolve_path(&self, path: &str) -> Result<PathBuf, RegistryError> {
        if self.roots.is_empty() {
            return Err(RegistryError::Forbidden(
                "loading adapters is disabled: start the server with --adapters DIR or --adapter-root DIR"
                    .into(),
            ));
        }
        let p = Path::new(path);
        let mut candidates: Vec<PathBuf> = Vec::new();
        if p.is_relative() {
            candidates.extend(self.roots.iter().map(|r| r.join(p)));
        }
        candidates.push(p.to_path_buf());
        for c in candidates {
            let Ok(canon) = c.canonicalize() else {
                continue;
            };
            if !self.inside_roots(&canon) {
                continue;
            }
            if !canon.is_dir() {
                return Err(RegistryError::Load(format!(
                    "adapter path `{path}` is not a directory"
                )));
            }
            return Ok(canon);
        }
        Err(RegistryError::Forbidden(format!(
            "adapter path `{path}` is not an adapter directory inside the allowed adapter roots"
        )))
    }

    /// Checks that every file the adapter loader reads from `dir` resolves (symlinks followed)
    /// to a file inside the roots; `path` is the requested path, for the message.
    fn check_files_inside_roots(&self, dir: &Path, path: &str) -> Result<(), RegistryError> {
        for file in ADAPTER_FILES {
            let f = dir.join(file);
            let Ok(meta) = f.symlink_metadata() else {
                continue; // missing: the loader says so
            };
            let inside = match f.canonicalize() {
                Ok(canon) => self.inside_roots(&canon),
                Err(_) => !meta.file_type().is_symlink(),
            };
            if !inside {
                return Err(RegistryError::Forbidden(format!(
                    "adapter file `{file}` of `{path}` resolves outside the allowed adapter roots"
                )));
            }
        }
        Ok(())
    }

    /// Loads the PEFT adapter at `path` (resolved by [`Registry::resolve_path`]) as `name`;
    /// every file it reads must resolve inside the roots too.
    pub fn load(
        &self,
        name: &str,
        path: &str,
        owner: Option<&str>,
    ) -> Result<Arc<AdapterEntry>, RegistryError> {
        validate_name(name).map_err(RegistryError::InvalidName)?;
        if self.reserved.iter().any(|r| r == name) {
            return Err(RegistryError::InvalidName(format!(
                "`{name}` is the base model's name"
            )));
        }
        if self.get(name).is_some() {
            return Err(RegistryError::Exists(name.into()));
        }
        let dir = self.resolve_path(path)?;
        self.check_files_inside_roots(&dir, path)?;
        // Errors name files by the path the caller gave, not where they are on the server.
        let server_dir = dir.display().to_string();
        self.load_unchecked(name, &dir, owner).map_err(|e| match e {
            RegistryError::Load(m) => RegistryError::Load(m.replace(&server_dir, path)),
            e => e,
        })
    }

    /// Loads `dir` as `name` without the root check (startup adapters from `--adapters`);
    /// adapters with NaN or infinite weights are refused.
    pub fn load_dir(&self, name: &str, dir: &Path) -> Result<Arc<AdapterEntry>, RegistryError> {
        validate_name(name).map_err(RegistryError::InvalidName)?;
        self.load_unchecked(name, dir, None)
    }

    /// Loads `dir` as `name` for `owner` without checking the name's characters: the server's
    /// own fine-tuned models (`ft:base:suffix:id`), whose directories it wrote itself.
    pub fn load_fine_tuned(
        &self,
        name: &str,
        dir: &Path,
        owner: &str,
    ) -> Result<Arc<AdapterEntry>, RegistryError> {
        match self.load_unchecked(name, dir, Some(owner)) {
            Err(RegistryError::Exists(_)) => {
                self.get(name).ok_or_else(|| RegistryError::NotFound(name.into()))
            }
            r => r,
        }
    }

    fn load_unchecked(
        &self,
        name: &str,
        dir: &Path,
        owner: Option<&str>,
    ) -> Result<Arc<AdapterEntry>, RegistryError> {
        let lora = load_peft_adapter(dir, &self.model.spec)
            .map_err(|e| RegistryError::Load(format!("cannot load adapter `{name}`: {e}")))?;
        check_finite(&lora).map_err(|e| RegistryError::Load(format!("cannot load adapter `{name}`: {e}")))?;
        let entry = Arc::new(AdapterEntry {
            name: name.to_string(),
            path: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
            adapter: self.model.upload_adapter(&lora),
            config: lora.config,
            created: now_secs(),
            owner: owner.map(str::to_string),
        });
        let mut map = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(name) {
            return Err(RegistryError::Exists(name.into()));
        }
        map.insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    /// Loads every subdirectory of `dir` that holds an `adapter_config.json`, named after the
    /// subdirectory; returns how many were loaded.
    pub fn load_all(&self, dir: &Path) -> Result<usize, RegistryError> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| RegistryError::Load(format!("cannot read {}: {e}", dir.display())))?;
        let mut subdirs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("adapter_config.json").is_file())
            .collect();
        subdirs.sort();
        for sub in &subdirs {
            let name = sub
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            self.load_dir(&name, sub)?;
        }
        Ok(subdirs.len())
    }

    /// Inserts an adapter built in memory (benchmarks, tests).
    pub fn insert(&self, entry: AdapterEntry) -> Result<Arc<AdapterEntry>, RegistryError> {
        validate_name(&entry.name).map_err(RegistryError::InvalidName)?;
        let mut map = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&entry.name) {
            return Err(RegistryError::Exists(entry.name));
        }
        let entry = Arc::new(entry);
        map.insert(entry.name.clone(), entry.clone());
        Ok(entry)
    }

    /// The adapter named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<AdapterEntry>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Removes `name`; sequences already using it keep it until they finish.
    pub fn remove(&self, name: &str) -> Result<Arc<AdapterEntry>, RegistryError> {
        self.adapters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    /// Every loaded adapter, by name.
    pub fn list(&self) -> Vec<Arc<AdapterEntry>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of loaded adapters.
    pub fn len(&self) -> usize {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no adapter is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_weights_name_the_tensor() {
        let spec = graft_model::ModelSpec::from_config_json(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5
        }))
        .unwrap();
        let mut a = LoraAdapter::zeros(
            LoraAdapterConfig::new(2, 4.0, &[LoraModule::Q, LoraModule::Down]),
            &spec,
        );
        assert_eq!(check_finite(&a), Ok(()));
        a.layers[1].get_mut(LoraModule::Down).as_mut().unwrap().a[1] = f32::NEG_INFINITY;
        let e = check_finite(&a).unwrap_err();
        assert!(
            e.contains("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"),
            "{e}"
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("my-adapter_1.v2").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_name(&"a".repeat(64)).is_ok());
    }
}
