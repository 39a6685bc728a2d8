//! Hugging Face checkpoints: reading `model.safetensors` (single or sharded) and writing
//! safetensors files and HF model directories.

use super::{Backing, DType, Entry, LoadedModel, TensorInfo, TokenizerSource, WeightStore, map_file};
use crate::config::ModelSpec;
use crate::error::ModelError;
use half::bf16;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

/// Opens a Hugging Face model directory.
pub(super) fn load_hf_dir(dir: &Path) -> Result<LoadedModel, ModelError> {
    let config = dir.join("config.json");
    if !config.is_file() {
        let message = if dir.join("adapter_config.json").is_file() {
            "this is a PEFT adapter directory (adapter_config.json, no config.json); load the base model and \
             apply the adapter to it"
        } else {
            "not a Hugging Face model directory: config.json is missing"
        };
        return Err(ModelError::format(dir, message));
    }
    let spec = ModelSpec::from_config_file(&config)?;
    let weights = open_hf_weights(dir)?;
    let tokenizer = if dir.join("tokenizer.json").is_file() || dir.join("tokenizer.model").is_file() {
        TokenizerSource::HfDir(dir.to_path_buf())
    } else {
        TokenizerSource::Missing
    };
    Ok(LoadedModel {
        spec,
        weights,
        tokenizer,
        path: dir.to_path_buf(),
    })
}

/// Opens the weights of an HF directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn open_hf_weights(dir: &Path) -> Result<WeightStore, ModelError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut store = WeightStore::new(dir);
    if single.is_file() {
        add_safetensors_file(&mut store, &single)?;
        return Ok(store);
    }
    if !index.is_file() {
        let pickle =
            dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file();
        let message = if pickle {
            "only PyTorch pickle weights (pytorch_model.bin) found; graft reads safetensors: re-save the \
             checkpoint with save_pretrained(safe_serialization=True)"
        } else {
            "no weights: expected model.safetensors or model.safetensors.index.json"
        };
        return Err(ModelError::format(dir, message));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::format(&index, format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.display().to_string(),
            field: "weight_map".into(),
            message: "missing or not an object of tensor name → shard file".into(),
        })?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::Config {
            path: index.display().to_string(),
            field: format!("weight_map.{name}"),
            message: "expected a file name".into(),
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(ModelError::Config {
                path: index.display().to_string(),
                field: format!("weight_map.{name}"),
                message: format!("shard `{file}` must be a file name inside the model directory"),
            });
        }
        shards.insert(file.to_string());
    }
    for shard in &shards {
        add_safetensors_file(&mut store, &dir.join(shard))?;
    }
    for (name, file) in map {
        if !store.contains(name) && !store.unsupported.contains_key(name) {
            return Err(ModelError::tensor(
                &index,
                name,
                format!(
                    "listed in weight_map as in `{}` but not found there",
                    file.as_str().unwrap_or("?")
                ),
            ));
        }
    }
    Ok(store)
}

/// Opens one safetensors file as a store, tensors under the names the file gives them (no
/// renaming): for reference tensors, adapters and other non-model files.
pub fn open_safetensors(path: &Path) -> Result<WeightStore, ModelError> {
    let mut store = WeightStore::new(path);
    add_safetensors_file(&mut store, path)?;
    Ok(store)
}

/// Maps one safetensors file and adds its tensors to `store`.
fn add_safetensors_file(store: &mut WeightStore, path: &Path) -> Result<(), ModelError> {
    let map = map_file(path)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<(String, safetensors::tensor::TensorInfo)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let source = store.add_source(path, Backing::Mmap(map));
    for (name, info) in tensors {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                store.unsupported.insert(name, (format!("{other:?}"), source));
                continue;
            }
        };
        let (start, end) = info.data_offsets;
        let entry = Entry {
            info: TensorInfo {
                name,
                shape: info.shape,
                dtype,
            },
            source,
            offset: data_start + start,
            len: end - start,
            rope_heads: None,
        };
        store.insert(entry, path)?;
    }
    Ok(())
}

/// Element types [`write_safetensors`] can write.
#[derive(Clone, Copy)]
enum SaveAs {
    F32,
    BF16,
}

/// Writes f32 tensors `(name, shape, values)` to a safetensors file, atomically (to `path.tmp`,
/// fsync, rename). `metadata` becomes the `__metadata__` header entry.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    write_safetensors(path, tensors, metadata, SaveAs::F32)
}

/// Like [`save_safetensors`], storing the values as bf16 (rounded to nearest even).
pub fn save_safetensors_bf16(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    write_safetensors(path, tensors, metadata, SaveAs::BF16)
}

fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
    save_as: SaveAs,
) -> Result<(), ModelError> {
    let elem = match save_as {
        SaveAs::F32 => 4,
        SaveAs::BF16 => 2,
    };
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(ModelError::tensor(
                path,
                name,
                format!("shape {shape:?} needs {numel} values, got {}", values.len()),
            ));
        }
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(ModelError::tensor(
                path,
                name,
                "duplicate or reserved tensor name",
            ));
        }
        let bytes = numel * elem;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": match save_as { SaveAs::F32 => "F32", SaveAs::BF16 => "BF16" },
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| ModelError::format(path, format!("cannot encode the header: {e}")))?;
    // The data section starts 8-byte aligned, as the reference writer does.
    while (header_bytes.len() + 8) % 8 != 0 {
        header_bytes.push(b' ');
    }
    write_atomically(path, |w| {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, values) in tensors {
            for chunk in values.chunks(1 << 14) {
                buf.clear();
                match save_as {
                    SaveAs::F32 => chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                    SaveAs::BF16 => chunk
                        .iter()
                        .for_each(|v| buf.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

/// Writes a file through `write` into `path.tmp`, fsyncs it and renames it over `path`.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), ModelError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::io(path, e));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(parent)
    {
        // Persist the rename; failing to sync a directory is not fatal on every filesystem.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (to `path.tmp`, fsync, rename).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_atomically(path, |w| w.write_all(bytes))
}

/// Writes a Hugging Face model directory: `config.json` (from [`ModelSpec::to_config_json`]) and
/// `model.safetensors` (f32, one file). Creates `dir` if needed.
pub fn save_hf_model_dir(
    dir: &Path,
    spec: &ModelSpec,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&dir.join("model.safetensors"), tensors, Some(meta))?;
    let config = dir.join("config.json");
    let text = serde_json::to_string_pretty(&spec.to_config_json())
        .map_err(|e| ModelError::format(&config, format!("cannot encode: {e}")))?;
    write_file_atomically(&config, text.as_bytes())
}
