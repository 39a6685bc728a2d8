//! Opening a model path for the commands: weights (HF directory, llama2.c `.bin`, GGUF), its
//! tokenizer and chat template, and an optional PEFT adapter.

use anyhow::Result;
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::Cpu;
use graft_model::model::{Model, WeightStorage};
use graft_model::weights::{LoadedModel, load_model};
use std::path::Path;

/// A model ready to run, with what is needed to talk to it in text.
pub struct OpenModel {
    pub model: Model<Cpu>,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// Loads the tokenizer (and chat template) that belongs to a loaded model, or `override_path`.
pub fn load_tokenizer(
    loaded: &LoadedModel,
    override_path: Option<&Path>,
) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    Ok(graft_hub::load_tokenizer(loaded, override_path, "--tokenizer")?)
}

/// Opens `path` (and `adapter`, a PEFT adapter directory) for inference.
pub fn open(
    path: &Path,
    tokenizer: Option<&Path>,
    adapter: Option<&Path>,
    storage: WeightStorage,
) -> Result<OpenModel> {
    let loaded = load_model(&graft_hub::hub::resolve_model_path(&path.to_string_lossy())?)?;
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, storage)?;
    if let Some(dir) = adapter {
        let a = graft_model::peft::load_peft_adapter(dir, &loaded.spec)?;
        model.set_adapter(&a);
    }
    let (tokenizer, template) = load_tokenizer(&loaded, tokenizer)?;
    Ok(OpenModel {
        model,
        tokenizer,
        template,
    })
}
