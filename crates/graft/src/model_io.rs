//! Opening a model path for the commands: weights (HF directory, llama2.c `.bin`, GGUF), its
//! tokenizer and chat template, and an optional PEFT adapter.

use anyhow::{Context, Result, bail};
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::Cpu;
use graft_model::model::{Model, WeightStorage};
use graft_model::weights::{LoadedModel, TokenizerSource, load_model};
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
    if let Some(p) = override_path {
        return graft_data::load_tokenizer_and_template(p)
            .with_context(|| format!("loading tokenizer from {}", p.display()));
    }
    match &loaded.tokenizer {
        TokenizerSource::HfDir(dir) => graft_data::load_tokenizer_and_template(dir)
            .with_context(|| format!("loading tokenizer from {}", dir.display())),
        TokenizerSource::Llama2cFile(file) => Ok((Tokenizer::from_llama2c_file(file)?, None)),
        TokenizerSource::Gguf {
            pieces,
            scores,
            token_types,
            bos,
            eos,
            model,
            chat_template,
            ..
        } => {
            if model != "llama" {
                bail!(
                    "{}: GGUF tokenizer model `{model}` is not supported yet (only SentencePiece `llama`); \
                     pass --tokenizer with a tokenizer.json directory",
                    loaded.path.display()
                );
            }
            let tok = Tokenizer::from_sentencepiece_vocab(
                pieces.clone(),
                scores.clone(),
                token_types.clone(),
                *bos,
                *eos,
            )?;
            let template = match chat_template {
                Some(t) => Some(ChatTemplate::new(t, tok.special_tokens().clone())?),
                None => None,
            };
            Ok((tok, template))
        }
        TokenizerSource::Missing => bail!(
            "{}: no tokenizer found beside the model; pass --tokenizer PATH",
            loaded.path.display()
        ),
    }
}

/// Opens `path` (and `adapter`, a PEFT adapter directory) for inference.
pub fn open(
    path: &Path,
    tokenizer: Option<&Path>,
    adapter: Option<&Path>,
    storage: WeightStorage,
) -> Result<OpenModel> {
    let loaded = load_model(path)?;
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
