//! A model's tokenizer and chat template as GGUF `tokenizer.*` metadata, for `graft export gguf`.
//!
//! A GGUF base keeps its own keys, copied as they are. Any other base (a Hugging Face folder, a
//! tiktoken or SentencePiece file, …) has its tokenizer in graft as a `tokenizers` pipeline, which
//! maps onto llama.cpp's two vocabulary kinds the way llama.cpp's converter does:
//! byte-level BPE → `tokenizer.ggml.model = gpt2` with the `pre` name of its pre-tokenizer;
//! SentencePiece-style BPE with byte fallback → `llama`, each merged piece scored by its merge's
//! priority (llama.cpp's SentencePiece tokenizer merges the highest score first).

use crate::open::OpenError;
use graft_data::{ChatTemplate, Tokenizer};
use graft_model::weights::{GgufValue, LoadedModel, TokenizerSource, read_gguf};
use serde_json::Value;
use std::collections::HashMap;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn err(m: impl Into<String>) -> OpenError {
    OpenError(m.into())
}

fn s(x: &str) -> GgufValue {
    GgufValue::String(x.to_string())
}

/// The `tokenizer.*` keys for `loaded`'s tokenizer `tok` (`template`, when given, replaces the
/// chat template), with `n_vocab` tokens (the embedding's rows; ids the tokenizer lacks become
/// unused `[PAD{id}]` tokens, as llama.cpp's converter writes them).
pub fn gguf_tokenizer_metadata(
    loaded: &LoadedModel,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    n_vocab: usize,
) -> Result<Vec<(String, GgufValue)>, OpenError> {
    let mut out = if matches!(loaded.tokenizer, TokenizerSource::Gguf { .. }) {
        let file = read_gguf(&loaded.path).map_err(|e| err(e.to_string()))?;
        let mut keys: Vec<(String, GgufValue)> = file
            .metadata
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys
    } else {
        from_pipeline(tok, n_vocab)?
    };
    if let Some(t) = template.or(tok.chat_template()) {
        out.retain(|(k, _)| k != "tokenizer.chat_template");
        out.push(("tokenizer.chat_template".into(), s(t.source())));
    }
    Ok(out)
}

/// Builds the keys from graft's `tokenizers` pipeline.
fn from_pipeline(tok: &Tokenizer, n_vocab: usize) -> Result<Vec<(String, GgufValue)>, OpenError> {
    let json: Value = serde_json::from_str(&tok.inner().to_string(false).map_err(|e| err(e.to_string()))?)
        .map_err(|e| err(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(err(format!(
            "the tokenizer is a {} model; GGUF export handles BPE vocabularies (byte-level or SentencePiece-style)",
            model["type"]
        )));
    }
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut put = |id: usize, t: &str| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(t.to_string());
    };
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(id) = id.as_u64() {
            put(id as usize, t);
        }
    }
    let mut added_types: HashMap<usize, i32> = HashMap::new();
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        put(id as usize, content);
        let special = a["special"].as_bool().unwrap_or(false);
        added_types.insert(id as usize, if special { CONTROL } else { USER_DEFINED });
    }
    if tokens.len() > n_vocab {
        return Err(err(format!(
            "the tokenizer has {} tokens but the model's embedding only {n_vocab} rows",
            tokens.len()
        )));
    }
    tokens.resize(n_vocab, None);
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(x) => Some(x.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let byte_level = json["decoder"]["type"] == "ByteLevel"
        || json["pre_tokenizer"]["type"] == "ByteLevel"
        || json["pre_tokenizer"]["pretokenizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(|p| p["type"] == "ByteLevel"));
    let mut out = Vec::new();
    let types: Vec<i32>;
    if byte_level {
        let pre = pre_name(&json["pre_tokenizer"])?;
        types = (0..n_vocab)
            .map(|id| match (&tokens[id], added_types.get(&id)) {
                (None, _) => UNUSED,
                (_, Some(&t)) => t,
                _ => NORMAL,
            })
            .collect();
        out.push(("tokenizer.ggml.model".into(), s("gpt2")));
        out.push(("tokenizer.ggml.pre".into(), s(pre)));
    } else if model["byte_fallback"].as_bool() == Some(true) {
        let rank: HashMap<String, usize> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| (m.replacen(' ', "", 1), i))
            .collect();
        let unk = model["unk_token"].as_str();
        types = (0..n_vocab)
            .map(|id| match (&tokens[id], added_types.get(&id)) {
                (None, _) => UNUSED,
                (Some(t), _) if Some(t.as_str()) == unk => UNKNOWN,
                (_, Some(&t)) => t,
                (Some(t), _) if is_byte_token(t) => BYTE,
                _ => NORMAL,
            })
            .collect();
        let scores: Vec<GgufValue> = tokens
            .iter()
            .map(|t| {
                let r = t.as_ref().and_then(|t| rank.get(t));
                GgufValue::F32(r.map_or(0.0, |&r| -(r as f32) - 1.0))
            })
            .collect();
        out.push(("tokenizer.ggml.model".into(), s("llama")));
        out.push(("tokenizer.ggml.pre".into(), s("default")));
        out.push(("tokenizer.ggml.scores".into(), GgufValue::Array(scores)));
        let prepends = json["normalizer"].to_string().contains("\"prepend\":\"▁\"")
            || json["pre_tokenizer"]["type"] == "Metaspace"
                && json["pre_tokenizer"]["prepend_scheme"] != "never";
        out.push((
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(prepends),
        ));
    } else {
        return Err(err(
            "the tokenizer is neither byte-level BPE nor SentencePiece-style BPE with byte fallback, the two \
             vocabularies llama.cpp runs",
        ));
    }
    let names: Vec<GgufValue> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| s(t.as_deref().unwrap_or(&format!("[PAD{id}]"))))
        .collect();
    out.push(("tokenizer.ggml.tokens".into(), GgufValue::Array(names)));
    out.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
    ));
    if byte_level {
        out.push((
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(merges.iter().map(|m| s(m)).collect()),
        ));
    }
    if let Some(b) = tok.bos_id() {
        out.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = tok.eos_ids().first() {
        out.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(u) = model["unk_token"].as_str().and_then(|u| tok.token_to_id(u)) {
        out.push(("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(u)));
    }
    if let Some(p) = tok.pad_id() {
        out.push(("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(p)));
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(tok.adds_bos()),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(tok.adds_eos()),
    ));
    Ok(out)
}

/// `<0x0A>`-style byte-fallback pieces.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// llama.cpp's `tokenizer.ggml.pre` name for a byte-level pre-tokenizer, or an error showing it.
fn pre_name(pre: &Value) -> Result<&'static str, OpenError> {
    let is_byte_level =
        |p: &Value, regex: bool| p["type"] == "ByteLevel" && p["use_regex"].as_bool() == Some(regex);
    if is_byte_level(pre, true) {
        return Ok("gpt2");
    }
    if let Some(parts) = pre["pretokenizers"].as_array() {
        let split = parts
            .iter()
            .find(|p| p["type"] == "Split")
            .and_then(|p| p["pattern"]["Regex"].as_str());
        match (parts.len(), split) {
            (2, Some(r)) if r == graft_data::tokenizer::LLAMA3_PATTERN && is_byte_level(&parts[1], false) => {
                return Ok("llama-bpe");
            }
            (2, Some(r)) if r == graft_data::tokenizer::QWEN2_PATTERN && is_byte_level(&parts[1], false) => {
                return Ok("qwen2");
            }
            (2, None)
                if parts[0]["type"] == "Digits"
                    && parts[0]["individual_digits"].as_bool() == Some(true)
                    && is_byte_level(&parts[1], true) =>
            {
                return Ok("smollm");
            }
            _ => {}
        }
    }
    Err(err(format!(
        "the tokenizer's pre-tokenizer {pre} is none llama.cpp names (gpt2, llama-bpe, qwen2, smollm); \
         llama.cpp would split text differently"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_data::TiktokenSpec;
    use std::path::PathBuf;

    fn shared(rel: &str) -> Option<PathBuf> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data")
            .join(rel);
        p.exists().then_some(p).or_else(|| {
            eprintln!("skipping: {rel} not found (needs ../shared/data)");
            None
        })
    }

    fn get<'a>(keys: &'a [(String, GgufValue)], k: &str) -> Option<&'a GgufValue> {
        keys.iter().find(|(key, _)| key == k).map(|(_, v)| v)
    }

    /// Llama 3's and Qwen2.5's byte-level vocabularies become `gpt2` with their own `pre`
    /// names, every rank a token, the added specials control tokens, the embedding's extra rows
    /// unused padding.
    #[test]
    fn tiktoken_vocabularies_name_their_pre_tokenizer() {
        for (rel, spec, pre, vocab) in [
            (
                "tokenizers/llama3/tokenizer.model",
                TiktokenSpec::llama3(),
                "llama-bpe",
                128256,
            ),
            (
                "tokenizers/qwen2.5/qwen.tiktoken",
                TiktokenSpec::qwen2(),
                "qwen2",
                151936,
            ),
        ] {
            let Some(path) = shared(rel) else { return };
            let tok = Tokenizer::from_tiktoken_file(&path, &spec).unwrap();
            let keys = from_pipeline(&tok, vocab).unwrap();
            assert_eq!(get(&keys, "tokenizer.ggml.model"), Some(&s("gpt2")), "{rel}");
            assert_eq!(get(&keys, "tokenizer.ggml.pre"), Some(&s(pre)), "{rel}");
            let Some(GgufValue::Array(tokens)) = get(&keys, "tokenizer.ggml.tokens") else {
                panic!()
            };
            let Some(GgufValue::Array(types)) = get(&keys, "tokenizer.ggml.token_type") else {
                panic!()
            };
            assert_eq!((tokens.len(), types.len()), (vocab, vocab), "{rel}");
            let bos_or_first_special = tok.bos_id().unwrap_or(151643) as usize;
            assert_eq!(types[bos_or_first_special], GgufValue::I32(CONTROL), "{rel}");
            assert_eq!(types[0], GgufValue::I32(NORMAL), "{rel}");
            let Some(GgufValue::Array(merges)) = get(&keys, "tokenizer.ggml.merges") else {
                panic!()
            };
            assert!(merges.len() > 100_000, "{rel}: {} merges", merges.len());
            // The round trip: graft's own GGUF reader builds the same tokenizer from these keys.
            let pieces: Vec<String> = tokens.iter().map(|v| v.as_str().unwrap().to_string()).collect();
            let types: Vec<i32> = types.iter().map(|v| v.as_i64().unwrap() as i32).collect();
            let merges: Vec<String> = merges.iter().map(|v| v.as_str().unwrap().to_string()).collect();
            let back =
                Tokenizer::from_gguf_bpe(&pieces, &types, &merges, Some(pre), tok.bos_id(), None).unwrap();
            for text in [
                "Hello, world! 12345 apples",
                "  indented\n\tcode() {}",
                "naïve café 日本語",
            ] {
                assert_eq!(
                    back.encode(text, false).unwrap().ids,
                    tok.encode(text, false).unwrap().ids,
                    "{rel}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn unknown_pre_tokenizers_are_named() {
        let pre: Value = serde_json::json!({"type": "Whitespace"});
        let e = pre_name(&pre).unwrap_err().to_string();
        assert!(e.contains("Whitespace") && e.contains("llama-bpe"), "{e}");
    }
}
