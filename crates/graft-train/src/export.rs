//! `graft export`: a finished run (or any model graft opens) in the forms other tools run.
//!
//! - [`export_gguf`]: the merged model as one GGUF file for llama.cpp, of a llama.cpp file type
//!   (`f16`, `q8_0`, `q4_k_m`, …) with the tensor-type mix llama.cpp's quantizer would choose;
//!   tokenizer and chat template in its metadata.
//! - [`export_gguf_lora`]: the adapter alone as a llama.cpp LoRA GGUF (`--lora`).
//! - [`export_ollama`]: a folder with the merged GGUF and a Modelfile (Go-template `TEMPLATE`,
//!   `PARAMETER stop`, default `SYSTEM`), registered with `ollama create` when Ollama is installed.
//! - `graft export merge` (a Hugging Face folder) lives with the trainer: `sft::export_merged`.

use crate::config::TrainConfig;
use crate::sft::{TrainError, config_chat_template, load_tokenizer};
use graft_data::{ChatTemplate, Message, Tokenizer};
use graft_model::peft::{LoraAdapter, load_peft_adapter};
use graft_model::weights::quantize::FileType;
use graft_model::weights::{DType, LoadedModel, load_model, save_gguf_lora, save_gguf_model};
use std::path::{Path, PathBuf};

fn err(msg: impl std::fmt::Display) -> TrainError {
    TrainError(msg.to_string())
}

/// A model opened for export: the base as loaded, its tokenizer and chat template, and (for a
/// run) the run's config and adapter.
struct ExportSource {
    base: LoadedModel,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// The run's LoRA adapter, when the run trained one.
    adapter: Option<LoraAdapter>,
    /// A full fine-tune's own weights (`model/`), when the run trained the whole model.
    full_model: Option<PathBuf>,
    /// `general.name`: the run's or the model's folder name.
    name: String,
}

fn file_name(p: &Path) -> String {
    p.file_stem()
        .or(p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Opens `run_or_model`: a run directory (holding `config.toml`) or a model path graft loads
/// (HF folder, GGUF file, hub id, `ollama:NAME`).
fn open_source(run_or_model: &str) -> Result<ExportSource, TrainError> {
    let as_path = Path::new(run_or_model);
    let cfg_path = as_path.join("config.toml");
    if as_path.is_dir() && cfg_path.is_file() {
        let cfg = TrainConfig::load(&cfg_path, &[]).map_err(err)?;
        let base_path = graft_hub::hub::resolve_model_path(&cfg.model.path)
            .map_err(|e| err(format!("{}: model.path: {e}", cfg_path.display())))?;
        let base = load_model(&base_path).map_err(|e| err(format!("model.path: {e}")))?;
        let (tokenizer, mut template) = load_tokenizer(
            &base,
            cfg.model.tokenizer.as_deref().map(Path::new),
            "model.tokenizer",
        )?;
        if let Some(t) = &cfg.data.chat_template {
            template = Some(config_chat_template(t, &tokenizer)?);
        }
        let adapter_dir = as_path.join("adapter");
        let model_dir = as_path.join("model");
        let (adapter, full_model) = if adapter_dir.join("adapter_config.json").exists() {
            (
                Some(load_peft_adapter(&adapter_dir, &base.spec).map_err(err)?),
                None,
            )
        } else if model_dir.join("config.json").exists() {
            (None, Some(model_dir))
        } else {
            return Err(err(format!(
                "{}: no adapter/ or model/ output (did the run finish?)",
                as_path.display()
            )));
        };
        return Ok(ExportSource {
            base,
            tokenizer,
            template,
            adapter,
            full_model,
            name: file_name(as_path),
        });
    }
    let not_a_run = |e: String| {
        if as_path.is_dir() {
            err(format!(
                "{run_or_model}: neither a run directory (no config.toml) nor a model ({e})"
            ))
        } else {
            err(e)
        }
    };
    let path = graft_hub::hub::resolve_model_path(run_or_model).map_err(|e| not_a_run(e.to_string()))?;
    let base = load_model(&path).map_err(|e| not_a_run(e.to_string()))?;
    let (tokenizer, template) = load_tokenizer(&base, None, "--tokenizer")?;
    Ok(ExportSource {
        base,
        tokenizer,
        template,
        adapter: None,
        full_model: None,
        name: file_name(&path),
    })
}

impl ExportSource {
    /// The exported model's tensors (HF names and shapes) and a reader of each one's f32 values
    /// with the run's adapter merged in: one tensor in memory at a time, read from the
    /// (memory-mapped) base or full fine-tune.
    fn merged_tensors(&self) -> Result<MergedTensors<'_>, TrainError> {
        let full = match &self.full_model {
            Some(dir) => Some(load_model(dir).map_err(err)?),
            None => None,
        };
        let spec = full.as_ref().map_or(&self.base.spec, |f| &f.spec).clone();
        Ok(MergedTensors {
            list: graft_model::weights::hf_tensor_shapes(&spec),
            spec,
            full,
            source: self,
        })
    }
}

/// See [`ExportSource::merged_tensors`].
struct MergedTensors<'a> {
    spec: graft_model::ModelSpec,
    list: Vec<(String, Vec<usize>)>,
    full: Option<LoadedModel>,
    source: &'a ExportSource,
}

impl MergedTensors<'_> {
    fn read(&self, i: usize) -> Result<Vec<f32>, graft_model::ModelError> {
        let (name, shape) = &self.list[i];
        let store = self
            .full
            .as_ref()
            .map_or(&self.source.base.weights, |f| &f.weights);
        let mut w = store.f32(name, shape)?;
        if let Some(adapter) = &self.source.adapter
            && let Some((layer, m)) = graft_model::peft::LoraModule::of_weight(name)
            && let Some(pair) = adapter.layers.get(layer).and_then(|l| l.get(m))
        {
            graft_model::peft::add_lora_delta(&mut w, &pair.a, &pair.b, pair.r, pair.scale, shape[1]);
        }
        Ok(w)
    }
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How many tensors were written in each type.
    pub type_counts: Vec<(DType, usize)>,
}

fn count_types(types: &[(String, DType)]) -> Vec<(DType, usize)> {
    let mut counts: Vec<(DType, usize)> = Vec::new();
    for (_, t) in types {
        match counts.iter_mut().find(|(d, _)| d == t) {
            Some((_, n)) => *n += 1,
            None => counts.push((*t, 1)),
        }
    }
    counts
}

fn write_merged_gguf(src: &ExportSource, out: &Path, ftype: FileType) -> Result<GgufExport, TrainError> {
    let tensors = src.merged_tensors()?;
    let tok_meta = graft_hub::gguf_tokenizer::gguf_tokenizer_metadata(
        &src.base,
        &src.tokenizer,
        src.template.as_ref(),
        tensors.spec.vocab_size,
    )
    .map_err(|e| err(format!("{}: tokenizer: {e}", src.base.path.display())))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    }
    let types = save_gguf_model(
        out,
        &tensors.spec,
        &tensors.list,
        |i| tensors.read(i),
        ftype,
        &src.name,
        &tok_meta,
    )
    .map_err(err)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(GgufExport {
        path: out.to_path_buf(),
        bytes,
        type_counts: count_types(&types),
    })
}

/// Writes `run_or_model` (a run directory, whose adapter is merged, or a model path) as one
/// GGUF file at `out` in llama.cpp file type `ftype`.
pub fn export_gguf(run_or_model: &str, out: &Path, ftype: FileType) -> Result<GgufExport, TrainError> {
    let src = open_source(run_or_model)?;
    write_merged_gguf(&src, out, ftype)
}

/// Writes the LoRA adapter of the run at `run_dir` as a llama.cpp LoRA GGUF at `out`.
pub fn export_gguf_lora(run_dir: &Path, out: &Path) -> Result<(), TrainError> {
    let src = open_source(&run_dir.to_string_lossy())?;
    let Some(adapter) = &src.adapter else {
        return Err(err(format!(
            "{}: the run has no LoRA adapter (adapter/adapter_config.json); a full fine-tune exports with \
             `graft export gguf`",
            run_dir.display()
        )));
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    }
    save_gguf_lora(out, &src.base.spec, adapter, &src.name).map_err(err)
}

/// What [`export_ollama`] wrote and did.
#[derive(Debug, Clone)]
pub struct OllamaExport {
    /// The merged GGUF.
    pub gguf: GgufExport,
    /// The Modelfile beside it.
    pub modelfile: PathBuf,
    /// `Some(output)` when `ollama create` ran (successfully), `None` when Ollama is not installed.
    pub created: Option<String>,
}

/// Writes a folder `out_dir` with `model.gguf` (the merged model, `ftype`) and a `Modelfile`
/// for the model's chat format, then runs `ollama create NAME -f Modelfile` when `ollama` is on
/// PATH. `template_override` is an Ollama Go template to use instead of the derived one.
pub fn export_ollama(
    run_or_model: &str,
    out_dir: &Path,
    name: &str,
    ftype: FileType,
    template_override: Option<&str>,
) -> Result<OllamaExport, TrainError> {
    let src = open_source(run_or_model)?;
    let chat = match template_override {
        Some(t) => OllamaChat {
            template: t.to_string(),
            stops: Vec::new(),
            system: None,
        },
        None => {
            let template = src.template.as_ref().ok_or_else(|| {
                err(format!(
                    "{}: the model has no chat template; give one with --template FILE (an Ollama Go template)",
                    src.base.path.display()
                ))
            })?;
            ollama_chat(template, &src.tokenizer)?
        }
    };
    std::fs::create_dir_all(out_dir).map_err(|e| err(format!("{}: {e}", out_dir.display())))?;
    let gguf = write_merged_gguf(&src, &out_dir.join("model.gguf"), ftype)?;
    let modelfile = out_dir.join("Modelfile");
    let text = chat.modelfile("./model.gguf");
    graft_model::weights::write_file_atomically(&modelfile, text.as_bytes()).map_err(err)?;
    let created = match std::process::Command::new("ollama")
        .arg("create")
        .arg(name)
        .arg("-f")
        .arg("Modelfile")
        .current_dir(out_dir)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(format!("running `ollama create {name}`: {e}"))),
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            return Err(err(format!(
                "`ollama create {name} -f {}` failed ({}): {}",
                modelfile.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
    };
    Ok(OllamaExport {
        gguf,
        modelfile,
        created,
    })
}

/// A chat format as Ollama describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaChat {
    /// The Go template (`TEMPLATE`).
    pub template: String,
    /// End-of-turn strings (`PARAMETER stop`).
    pub stops: Vec<String>,
    /// The template's default system prompt (`SYSTEM`), if it has one.
    pub system: Option<String>,
}

impl OllamaChat {
    /// The Modelfile text for a model file at `from`.
    pub fn modelfile(&self, from: &str) -> String {
        let mut m = format!("FROM {from}\n\nTEMPLATE \"\"\"{}\"\"\"\n", self.template);
        if let Some(s) = &self.system {
            m.push_str(&format!("\nSYSTEM \"\"\"{s}\"\"\"\n"));
        }
        if !self.stops.is_empty() {
            m.push('\n');
        }
        for s in &self.stops {
            m.push_str(&format!("PARAMETER stop {}\n", go_quote(s)));
        }
        m
    }
}

fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The chat formats graft can describe in Ollama's template language, told apart by the markers
/// their templates render.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ChatFamily {
    /// `<|im_start|>role\n…<|im_end|>\n` (Qwen, SmolLM, many fine-tunes).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3.x).
    Llama3,
    /// `<|role|>\n…</s>` or `<|end|>` (Zephyr, TinyLlama, Phi-3).
    PipeRole { end: &'static str },
    /// `<start_of_turn>role\n…<end_of_turn>\n` (Gemma; the assistant role is `model`).
    Gemma,
}

const SENTINEL_SYSTEM: &str = "GRAFT-SYSTEM-7f3a";
const SENTINEL_USER: &str = "GRAFT-USER-7f3a";

/// Derives the Ollama form of `template`: recognises its family from a rendered conversation and
/// takes the default system prompt from what it renders before a lone user message.
pub fn ollama_chat(template: &ChatTemplate, tok: &Tokenizer) -> Result<OllamaChat, TrainError> {
    let with_system = [
        Message::new("system", SENTINEL_SYSTEM),
        Message::new("user", SENTINEL_USER),
    ];
    let render = |messages: &[Message]| {
        template
            .render_text(messages, None, true, &Default::default())
            .map_err(|e| err(format!("rendering the chat template: {e}")))
    };
    let lone = render(&[Message::new("user", SENTINEL_USER)])?;
    // Some templates refuse a system message (Mistral, Llama 2 variants): judge by the lone user.
    let rendered = render(&with_system).unwrap_or_else(|_| lone.clone());
    let family = if rendered.contains("<|im_start|>user\n") {
        ChatFamily::ChatMl
    } else if rendered.contains("<|start_header_id|>user<|end_header_id|>") {
        ChatFamily::Llama3
    } else if rendered.contains("<start_of_turn>user\n") {
        ChatFamily::Gemma
    } else if rendered.contains("<|user|>") {
        let end = if rendered.contains("<|end|>") {
            "<|end|>"
        } else {
            "</s>"
        };
        ChatFamily::PipeRole { end }
    } else {
        return Err(err(format!(
            "the model's chat template renders a format graft cannot translate into an Ollama template \
             (known: ChatML, Llama 3, Gemma, Zephyr/Phi-3); give one with --template FILE. It renders:\n{}",
            rendered.chars().take(400).collect::<String>()
        )));
    };
    let system = default_system(family, &lone);
    let (template, mut stops) = match family {
        ChatFamily::ChatMl => (
            concat!(
                "{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n",
                "{{ .Content }}<|im_end|>\n",
                "{{ end }}<|im_start|>assistant\n"
            )
            .to_string(),
            vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()],
        ),
        ChatFamily::Llama3 => (
            concat!(
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n",
                "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
            )
            .to_string(),
            vec!["<|start_header_id|>".into(), "<|end_header_id|>".into(), "<|eot_id|>".into()],
        ),
        ChatFamily::Gemma => (
            concat!(
                // Gemma has no system turn: the system text opens the next user turn.
                "{{- $system := \"\" }}{{- range .Messages }}{{- if eq .Role \"system\" }}{{ $system = .Content }}",
                "{{- else }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n",
                "{{ if and $system (eq .Role \"user\") }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}",
                "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
            )
            .to_string(),
            vec!["<start_of_turn>".into(), "<end_of_turn>".into()],
        ),
        ChatFamily::PipeRole { end } => (
            format!(
                "{{{{- range .Messages }}}}<|{{{{ .Role }}}}|>\n{{{{ .Content }}}}{end}\n{{{{ end }}}}<|assistant|>\n"
            ),
            vec![end.to_string(), "<|user|>".into()],
        ),
    };
    for &e in tok.eos_ids() {
        if let Some(t) = tok.id_to_token(e)
            && !stops.contains(&t)
        {
            stops.push(t);
        }
    }
    Ok(OllamaChat {
        template,
        stops,
        system,
    })
}

/// The system prompt a template renders when the conversation has none.
fn default_system(family: ChatFamily, lone: &str) -> Option<String> {
    let (open, close) = match family {
        ChatFamily::ChatMl => ("<|im_start|>system\n", "<|im_end|>"),
        ChatFamily::Llama3 => ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        ChatFamily::Gemma => return None,
        ChatFamily::PipeRole { end } => ("<|system|>\n", end),
    };
    let before_user = &lone[..lone.find(SENTINEL_USER)?];
    let start = before_user.find(open)? + open.len();
    let len = before_user[start..].find(close)?;
    let s = before_user[start..start + len].trim();
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_data::SpecialTokens;

    /// Every real template of the families graft translates (tagged by Ollama's own template
    /// names in `../shared/data/chat_templates/ollama/index.json`) is recognised as its family;
    /// the others are refused with a message, never mistranslated.
    #[test]
    fn real_templates_map_to_their_ollama_family() {
        let index = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/chat_templates/ollama/index.json");
        let Ok(text) = std::fs::read_to_string(&index) else {
            eprintln!("skipping: {} not found (needs ../shared/data)", index.display());
            return;
        };
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let tok = Tokenizer::from_tokenizer_json_bytes(
            br#"{"version":"1.0","model":{"type":"BPE","vocab":{"a":0},"merges":[]}}"#,
        )
        .unwrap();
        let mut recognised = 0;
        for e in &entries {
            let name = e["name"].as_str().unwrap();
            let special = SpecialTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..Default::default()
            };
            let Ok(t) = ChatTemplate::new(e["template"].as_str().unwrap(), special) else {
                continue;
            };
            let expected = match name {
                "chatml" => Some("<|im_start|>"),
                "llama3-instruct" => Some("<|start_header_id|>"),
                "gemma-instruct" | "gemma3-instruct" => Some("<start_of_turn>"),
                "zephyr" | "phi-3" => Some("<|assistant|>"),
                _ => None,
            };
            match (ollama_chat(&t, &tok), expected) {
                (Ok(c), Some(marker)) => {
                    assert!(c.template.contains(marker), "{name}: {}", c.template);
                    recognised += 1;
                }
                (Ok(c), None) => panic!("{name} is not a family graft knows, yet it became {}", c.template),
                (Err(e), Some(_)) => panic!("{name}: {e}"),
                (Err(e), None) => assert!(e.to_string().contains("--template"), "{e}"),
            }
        }
        assert!(recognised >= 15, "{recognised}");
    }
}
