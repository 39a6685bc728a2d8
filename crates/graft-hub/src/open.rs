//! The tokenizer and chat template of a loaded model: from its Hugging Face folder, its llama2.c
//! tokenizer file, or the GGUF metadata (SentencePiece `llama` and byte-level BPE `gpt2`
//! vocabularies), or from an explicit override.

use graft_data::{ChatTemplate, Tokenizer};
use graft_model::weights::{LoadedModel, TokenizerSource};
use std::path::Path;

/// Why a model's tokenizer could not be opened; the message names the file and the setting.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenError(pub String);

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OpenError {}

fn err(e: impl std::fmt::Display) -> OpenError {
    OpenError(e.to_string())
}

/// Loads the tokenizer (and chat template) that belongs to `loaded`, or the one at
/// `override_path`. `tokenizer_option` is the setting that overrides it (`model.tokenizer`,
/// `--tokenizer`), named in errors.
pub fn load_tokenizer(
    loaded: &LoadedModel,
    override_path: Option<&Path>,
    tokenizer_option: &str,
) -> Result<(Tokenizer, Option<ChatTemplate>), OpenError> {
    if let Some(p) = override_path {
        return graft_data::load_tokenizer_and_template(p).map_err(err);
    }
    match &loaded.tokenizer {
        TokenizerSource::HfDir(dir) => graft_data::load_tokenizer_and_template(dir).map_err(err),
        TokenizerSource::Llama2cFile(file) => Ok((Tokenizer::from_llama2c_file(file).map_err(err)?, None)),
        TokenizerSource::Gguf {
            pieces,
            scores,
            token_types,
            merges,
            bos,
            eos,
            model,
            pre,
            chat_template,
        } => {
            let tok = match model.as_str() {
                "llama" => Tokenizer::from_sentencepiece_vocab(
                    pieces.clone(),
                    scores.clone(),
                    token_types.clone(),
                    *bos,
                    *eos,
                )
                .map_err(err)?,
                "gpt2" => Tokenizer::from_gguf_bpe(pieces, token_types, merges, pre.as_deref(), *bos, *eos)
                    .map_err(err)?,
                other => {
                    return Err(err(format!(
                        "{}: GGUF tokenizer model `{other}` is not supported (SentencePiece `llama` and \
                         byte-level BPE `gpt2` are); set {tokenizer_option} to a tokenizer.json directory",
                        loaded.path.display()
                    )));
                }
            };
            let template = match chat_template {
                Some(t) => Some(ChatTemplate::new(t, tok.special_tokens().clone()).map_err(err)?),
                None => None,
            };
            Ok((tok, template))
        }
        TokenizerSource::Missing => Err(err(format!(
            "{}: no tokenizer beside the model; set {tokenizer_option}",
            loaded.path.display()
        ))),
    }
}
