//! One [`Tokenizer`] type over every tokenizer format graft reads.
//!
//! All formats are turned into a Hugging Face `tokenizers` pipeline, so encoding, byte offsets,
//! added/special tokens and decoding behave exactly like `transformers` for every source:
//!
//! * `tokenizer.json` is loaded as is;
//! * tiktoken rank files (Llama 3 `tokenizer.model`, Qwen `qwen.tiktoken`) become a byte-level BPE
//!   whose merges are derived from the ranks (the merge of a pair has the rank of the merged token,
//!   which is exactly tiktoken's "merge the lowest-ranked adjacent pair" rule), plus the
//!   pre-tokenizer regex and special tokens of a [`TiktokenSpec`];
//! * SentencePiece-BPE vocabularies (llama2.c `tok512.bin`, GGUF `tokenizer.ggml.*` arrays) become a
//!   BPE with byte fallback whose merges are ordered by piece score (SentencePiece merges the pair
//!   whose merged piece scores highest), with the Llama dummy-prefix normalizer;
//! * GPT-2 style `vocab.json` + `merges.txt`.
//!
//! BOS/EOS addition follows `tokenizer_config.json` (`add_bos_token`/`add_eos_token`) when it says
//! so explicitly, otherwise the tokenizer's own post-processor.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result, read_file, read_text};
use crate::hash::ContentHasher;

/// Token ids of an encoded text with the byte range each token came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Byte offsets `(start, end)` into the encoded text, one per id; tokens added by the tokenizer
    /// (BOS/EOS) have an empty range.
    pub offsets: Vec<(usize, usize)>,
}

/// Strings of the special tokens, as chat templates see them (`bos_token`, `eos_token`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: Option<String>,
    /// Unknown token text.
    pub unk_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
    /// `additional_special_tokens` from the config.
    pub additional: Vec<String>,
}

/// Where a [`Tokenizer`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// A Hugging Face `tokenizer.json`.
    HuggingFace,
    /// A tiktoken rank file.
    Tiktoken,
    /// A SentencePiece-BPE vocabulary with scores (llama2.c, GGUF).
    SentencePiece,
    /// GPT-2 `vocab.json` + `merges.txt`.
    Gpt2,
}

/// Pre-tokenizer regex, special tokens and BOS/EOS rules that a tiktoken rank file does not carry.
#[derive(Clone, Debug)]
pub struct TiktokenSpec {
    /// Pre-tokenizer split regex.
    pub pattern: String,
    /// Special/added tokens: `(text, id, special)`; `special == false` marks added tokens that are
    /// matched in text but not skipped when decoding with `skip_special_tokens`.
    pub special_tokens: Vec<(String, u32, bool)>,
    /// Apply NFC normalisation before splitting (Qwen).
    pub nfc: bool,
    /// BOS id, if the model has one.
    pub bos: Option<u32>,
    /// Whether `encode(.., add_special_tokens=true)` prepends BOS.
    pub add_bos: bool,
    /// Stop token ids; the first is the primary EOS.
    pub eos: Vec<u32>,
    /// Padding id, if any.
    pub pad: Option<u32>,
    /// `clean_up_tokenization_spaces` for [`Tokenizer::decode`] (`" ."` → `"."`, …).
    pub clean_up_tokenization_spaces: bool,
}

/// The Llama 3 pre-tokenizer regex.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex (single digits).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TiktokenSpec {
    /// Llama 3 / 3.1 / 3.2: 256 special tokens from 128000 (Hugging Face names), BOS 128000 added,
    /// stop tokens 128001, 128008, 128009.
    pub fn llama3() -> Self {
        let mut special = Vec::with_capacity(256);
        for id in 128000u32..128256 {
            let name = match id {
                128000 => "<|begin_of_text|>".to_string(),
                128001 => "<|end_of_text|>".to_string(),
                128002 => "<|reserved_special_token_0|>".to_string(),
                128003 => "<|reserved_special_token_1|>".to_string(),
                128004 => "<|finetune_right_pad_id|>".to_string(),
                128005 => "<|reserved_special_token_2|>".to_string(),
                128006 => "<|start_header_id|>".to_string(),
                128007 => "<|end_header_id|>".to_string(),
                128008 => "<|eom_id|>".to_string(),
                128009 => "<|eot_id|>".to_string(),
                128010 => "<|python_tag|>".to_string(),
                _ => format!("<|reserved_special_token_{}|>", id - 128008),
            };
            special.push((name, id, true));
        }
        TiktokenSpec {
            pattern: LLAMA3_PATTERN.to_string(),
            special_tokens: special,
            nfc: false,
            bos: Some(128000),
            add_bos: true,
            eos: vec![128001, 128008, 128009],
            pad: Some(128004),
            clean_up_tokenization_spaces: true,
        }
    }

    /// Qwen2 / Qwen2.5 (and Qwen3's base vocabulary): NFC, single-digit regex, no BOS, 22 added
    /// tokens from 151643; stop tokens `<|im_end|>`, `<|endoftext|>`.
    pub fn qwen2() -> Self {
        let names = [
            ("<|endoftext|>", true),
            ("<|im_start|>", true),
            ("<|im_end|>", true),
            ("<|object_ref_start|>", true),
            ("<|object_ref_end|>", true),
            ("<|box_start|>", true),
            ("<|box_end|>", true),
            ("<|quad_start|>", true),
            ("<|quad_end|>", true),
            ("<|vision_start|>", true),
            ("<|vision_end|>", true),
            ("<|vision_pad|>", true),
            ("<|image_pad|>", true),
            ("<|video_pad|>", true),
            ("<tool_call>", false),
            ("</tool_call>", false),
            ("<|fim_prefix|>", false),
            ("<|fim_middle|>", false),
            ("<|fim_suffix|>", false),
            ("<|fim_pad|>", false),
            ("<|repo_name|>", false),
            ("<|file_sep|>", false),
        ];
        TiktokenSpec {
            pattern: QWEN2_PATTERN.to_string(),
            special_tokens: names
                .iter()
                .enumerate()
                .map(|(i, (n, s))| (n.to_string(), 151643 + i as u32, *s))
                .collect(),
            nfc: true,
            bos: None,
            add_bos: false,
            eos: vec![151645, 151643],
            pad: Some(151643),
            clean_up_tokenization_spaces: false,
        }
    }

    /// Picks a spec from the rank count: 128,000 ranks is Llama 3, 151,643 is Qwen2.
    pub fn guess(rank_count: usize) -> Option<Self> {
        match rank_count {
            128000 => Some(Self::llama3()),
            151643 => Some(Self::qwen2()),
            _ => None,
        }
    }
}

/// SentencePiece token types, as in `sentencepiece_model.proto` and GGUF `tokenizer.ggml.token_type`.
pub mod token_type {
    /// Ordinary piece.
    pub const NORMAL: i32 = 1;
    /// The unknown piece.
    pub const UNKNOWN: i32 = 2;
    /// Control symbol (BOS, EOS, chat markers).
    pub const CONTROL: i32 = 3;
    /// User-defined symbol (always matched as a whole).
    pub const USER_DEFINED: i32 = 4;
    /// Unused piece.
    pub const UNUSED: i32 = 5;
    /// Byte-fallback piece `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// A tokenizer: encode with byte offsets, decode, stream-decode, special-token metadata.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
    /// `Some` when BOS/EOS addition is decided here rather than by the inner post-processor.
    explicit_specials: Option<(bool, bool)>,
    clean_up_tokenization_spaces: bool,
    special_ids: HashSet<u32>,
    special_tokens: SpecialTokens,
    fingerprint: String,
    /// What the inner post-processor adds (BOS, EOS), measured once the ids are known.
    inner_adds_cache: Option<(bool, bool)>,
    /// The model folder's chat template, when loaded with [`Tokenizer::from_model_dir`].
    chat_template: Option<crate::template::ChatTemplate>,
    /// `<0xNN>` byte tokens and their byte, when the decoder has a `ByteFallback` step
    /// (SentencePiece-style vocabularies); empty otherwise.
    byte_tokens: HashMap<u32, u8>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Reads a special-token entry of `tokenizer_config.json`: a string or `{"content": …}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// The GPT-2 byte → printable-char table used by byte-level BPE.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    table
}

fn byte_level_string(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some((c - b'A') as u32),
            b'a'..=b'z' => Some((c - b'a') as u32 + 26),
            b'0'..=b'9' => Some((c - b'0') as u32 + 52),
            b'+' | b'-' => Some(62),
            b'/' | b'_' => Some(63),
            _ => None,
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8]),
            2 => out.push((acc >> 16) as u8),
            _ => return None,
        }
    }
    Some(out)
}

fn added_token_json(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// The `tokenizer.json` of a byte-level BPE model (GPT-2 / Llama 3 / Qwen style): the shared
/// post-processor and decoder, the given pre-tokenizer and normalizer, vocabulary and merges.
fn byte_level_bpe_json(
    added: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    ignore_merges: bool,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
) -> Value {
    let (post, decoder) = byte_level_pipeline();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post, "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
    })
}

/// A pre-tokenizer that splits with `pattern`, then maps bytes to byte-level characters.
fn regex_byte_level_pre_tokenizer(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]})
}

fn byte_level_pipeline() -> (Value, Value) {
    let post =
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let decoder =
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    (post, decoder)
}

impl Tokenizer {
    fn build(
        inner_json: Value,
        kind: TokenizerKind,
        fingerprint: String,
        bos: Option<u32>,
        eos: Vec<u32>,
        pad: Option<u32>,
        explicit_specials: Option<(bool, bool)>,
    ) -> Result<Self> {
        let byte_fallback = inner_json.get("decoder").is_some_and(has_byte_fallback_step);
        let inner: tokenizers::Tokenizer = serde_json::from_value(inner_json).map_err(tok_err)?;
        let byte_tokens = if byte_fallback {
            (0..=255u8)
                .filter_map(|b| inner.token_to_id(&format!("<0x{b:02X}>")).map(|id| (id, b)))
                .collect()
        } else {
            HashMap::new()
        };
        let mut t = Tokenizer {
            byte_tokens,
            inner,
            kind,
            bos,
            eos,
            pad,
            explicit_specials,
            clean_up_tokenization_spaces: false,
            special_ids: HashSet::new(),
            special_tokens: SpecialTokens::default(),
            fingerprint,
            inner_adds_cache: None,
            chat_template: None,
        };
        t.refresh_special_ids();
        t.special_tokens.bos_token = bos.and_then(|i| t.id_to_token(i));
        t.special_tokens.eos_token = t.eos.first().and_then(|&i| t.id_to_token(i));
        t.special_tokens.pad_token = pad.and_then(|i| t.id_to_token(i));
        Ok(t)
    }

    fn refresh_special_ids(&mut self) {
        self.special_ids = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
    }

    /// Loads a Hugging Face `tokenizer.json` (no config: BOS/EOS as its post-processor says).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        Self::from_tokenizer_json_bytes(&bytes)
            .map_err(|e| Error::invalid(path.display().to_string(), e.to_string()))
    }

    /// Loads a `tokenizer.json` from memory.
    pub fn from_tokenizer_json_bytes(bytes: &[u8]) -> Result<Self> {
        let mut value: Value = serde_json::from_slice(bytes).map_err(tok_err)?;
        // Offsets must cover every byte of a token (loss masks map byte spans to tokens), so
        // ByteLevel/Roberta post-processors must not trim whitespace off them; ids are unaffected.
        if let Some(pp) = value.get_mut("post_processor") {
            untrim_offsets(pp);
        }
        let mut h = ContentHasher::new();
        h.field(b"hf");
        h.field(bytes);
        let mut t = Self::build(
            value,
            TokenizerKind::HuggingFace,
            h.hex(),
            None,
            vec![],
            None,
            None,
        )?;
        // Without a config, guess BOS/EOS from common names.
        for name in ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"] {
            if let Some(id) = t.token_to_id(name) {
                t.bos = Some(id);
                t.special_tokens.bos_token = Some(name.to_string());
                break;
            }
        }
        for name in ["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>"] {
            if let Some(id) = t.token_to_id(name) {
                t.eos = vec![id];
                t.special_tokens.eos_token = Some(name.to_string());
                break;
            }
        }
        Ok(t.finalize())
    }

    /// Builds a byte-level BPE tokenizer from tiktoken ranks (`(token bytes, rank)`).
    pub fn from_tiktoken_ranks(ranks: Vec<(Vec<u8>, u32)>, spec: &TiktokenSpec) -> Result<Self> {
        let table = bytes_to_unicode();
        let mut by_bytes: HashMap<&[u8], u32> = HashMap::with_capacity(ranks.len());
        for (b, r) in &ranks {
            by_bytes.insert(b.as_slice(), *r);
        }
        let mut vocab = Map::with_capacity(ranks.len());
        let mut sorted: Vec<&(Vec<u8>, u32)> = ranks.iter().collect();
        sorted.sort_by_key(|(_, r)| *r);
        let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
        for (bytes, rank) in &sorted {
            vocab.insert(byte_level_string(bytes, &table), json!(rank));
            if bytes.len() < 2 {
                continue;
            }
            for split in 1..bytes.len() {
                let (l, r) = bytes.split_at(split);
                if let (Some(&lr), Some(&rr)) = (by_bytes.get(l), by_bytes.get(r)) {
                    merges.push((
                        *rank,
                        lr,
                        rr,
                        byte_level_string(l, &table),
                        byte_level_string(r, &table),
                    ));
                }
            }
        }
        merges.sort_by_key(|m| (m.0, m.1, m.2));
        let merges: Vec<Value> = merges.into_iter().map(|m| json!([m.3, m.4])).collect();
        let added: Vec<Value> = spec
            .special_tokens
            .iter()
            .map(|(s, id, special)| added_token_json(*id, s, *special))
            .collect();
        let normalizer = if spec.nfc {
            json!({"type": "NFC"})
        } else {
            Value::Null
        };
        let inner = byte_level_bpe_json(
            added,
            normalizer,
            regex_byte_level_pre_tokenizer(&spec.pattern),
            true,
            vocab,
            merges,
        );
        let mut h = ContentHasher::new();
        h.field(b"tiktoken");
        for (b, r) in &sorted {
            h.field(b);
            h.update(&r.to_le_bytes());
        }
        h.field(spec.pattern.as_bytes());
        for (s, id, sp) in &spec.special_tokens {
            h.field(s.as_bytes());
            h.update(&id.to_le_bytes());
            h.update(&[*sp as u8]);
        }
        h.update(&[spec.nfc as u8, spec.add_bos as u8]);
        let mut t = Self::build(
            inner,
            TokenizerKind::Tiktoken,
            h.hex(),
            spec.bos,
            spec.eos.clone(),
            spec.pad,
            Some((spec.add_bos && spec.bos.is_some(), false)),
        )?;
        t.clean_up_tokenization_spaces = spec.clean_up_tokenization_spaces;
        Ok(t)
    }

    /// Reads a tiktoken rank file (`base64-token rank` per line) and builds it with `spec`.
    pub fn from_tiktoken_file(path: &Path, spec: &TiktokenSpec) -> Result<Self> {
        let ranks = read_tiktoken_ranks(path)?;
        Self::from_tiktoken_ranks(ranks, spec)
    }

    /// Builds a SentencePiece-BPE tokenizer from pieces, scores and token types (as in GGUF
    /// `tokenizer.ggml.tokens/scores/token_type`; a plain space in a piece is read as `▁`).
    ///
    /// Control and unknown pieces become special tokens, user-defined pieces added tokens; merges
    /// are every split of a piece into two pieces, ordered by the merged piece's score (highest
    /// first). `encode(.., true)` prepends `bos` when given.
    pub fn from_sentencepiece_vocab(
        pieces: Vec<String>,
        scores: Vec<f32>,
        token_types: Vec<i32>,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let n = pieces.len();
        if scores.len() != n || (!token_types.is_empty() && token_types.len() != n) {
            return Err(Error::Tokenizer(format!(
                "sentencepiece vocab: {} pieces but {} scores and {} token types (expected equal lengths)",
                n,
                scores.len(),
                token_types.len()
            )));
        }
        let ty = |i: usize| token_types.get(i).copied().unwrap_or(token_type::NORMAL);
        let pieces: Vec<String> = pieces.into_iter().map(|p| p.replace(' ', "\u{2581}")).collect();
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
        let mut vocab = Map::with_capacity(n);
        let mut added = Vec::new();
        let mut unk: Option<String> = None;
        let mut has_bytes = false;
        for (i, p) in pieces.iter().enumerate() {
            if index.contains_key(p.as_str()) {
                continue;
            }
            index.insert(p.as_str(), i);
            vocab.insert(p.clone(), json!(i));
            match ty(i) {
                token_type::UNKNOWN => {
                    unk.get_or_insert_with(|| p.clone());
                    added.push(added_token_json(i as u32, p, true));
                }
                token_type::CONTROL => added.push(added_token_json(i as u32, p, true)),
                token_type::USER_DEFINED => added.push(added_token_json(i as u32, p, false)),
                token_type::BYTE => has_bytes = true,
                _ => {}
            }
        }
        let mut merges: Vec<(f32, usize, usize, usize, &str, &str)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if ty(i) != token_type::NORMAL || index.get(p.as_str()) != Some(&i) {
                continue;
            }
            for (split, _) in p.char_indices().skip(1) {
                let (l, r) = p.split_at(split);
                if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r))
                    && ty(li) == token_type::NORMAL
                    && ty(ri) == token_type::NORMAL
                {
                    merges.push((scores[i], i, li, ri, l, r));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        let merges_json: Vec<Value> = merges.iter().map(|m| json!([m.4, m.5])).collect();
        let inner = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
            ]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": has_bytes,
                      "ignore_merges": false, "vocab": vocab, "merges": merges_json}
        });
        let mut h = ContentHasher::new();
        h.field(b"spm");
        for (i, p) in pieces.iter().enumerate() {
            h.field(p.as_bytes());
            h.update(&scores[i].to_le_bytes());
            h.update(&ty(i).to_le_bytes());
        }
        h.update(&bos.map(|b| b as i64).unwrap_or(-1).to_le_bytes());
        h.update(&eos.map(|b| b as i64).unwrap_or(-1).to_le_bytes());
        let mut t = Self::build(
            inner,
            TokenizerKind::SentencePiece,
            h.hex(),
            bos,
            eos.into_iter().collect(),
            None,
            Some((bos.is_some(), false)),
        )?;
        t.special_tokens.unk_token = unk;
        Ok(t)
    }

    /// Loads a llama2.c tokenizer file (`tok512.bin`, `tokenizer.bin`): `i32 max_len`, then per id
    /// `f32 score, i32 len, bytes`. Ids 0/1/2 are `<unk>`/`<s>`/`</s>`, `<0xNN>` pieces are bytes.
    pub fn from_llama2c_file(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        let place = path.display().to_string();
        let (pieces, scores) = parse_llama2c_vocab(&bytes).map_err(|r| Error::invalid(&place, r))?;
        let mut types = Vec::with_capacity(pieces.len());
        let mut fixed = Vec::with_capacity(pieces.len());
        for (i, p) in pieces.into_iter().enumerate() {
            let is_byte = p.len() == 6 && p.starts_with("<0x") && p.ends_with('>');
            let (piece, ty) = match i {
                0 => ("<unk>".to_string(), token_type::UNKNOWN),
                1 => ("<s>".to_string(), token_type::CONTROL),
                2 => ("</s>".to_string(), token_type::CONTROL),
                _ if is_byte => (p, token_type::BYTE),
                _ => (p, token_type::NORMAL),
            };
            fixed.push(piece);
            types.push(ty);
        }
        Self::from_sentencepiece_vocab(fixed, scores, types, Some(1), Some(2))
    }

    /// Loads a SentencePiece `.model` protobuf (BPE models such as Llama 2 / Mistral `tokenizer.model`).
    /// Unigram models are refused with an error: their encoding is not a merge order.
    pub fn from_sentencepiece_model(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        let place = path.display().to_string();
        let model = parse_sentencepiece_model(&bytes).map_err(|r| Error::invalid(&place, r))?;
        if model.model_type != 2 {
            return Err(Error::invalid(
                place,
                format!(
                    "SentencePiece model type {} is not supported (only BPE, type 2)",
                    model.model_type
                ),
            ));
        }
        let n = model.pieces.len();
        let id = |v: i32| (v >= 0 && (v as usize) < n).then_some(v as u32);
        let (bos, eos) = (id(model.bos_id), id(model.eos_id));
        Self::from_sentencepiece_vocab(model.pieces, model.scores, model.types, bos, eos)
    }

    /// Builds a GPT-2 style byte-level BPE from `vocab.json` and `merges.txt`.
    pub fn from_gpt2_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self> {
        let vocab_bytes = read_file(vocab_json)?;
        let vocab: Map<String, Value> = serde_json::from_slice(&vocab_bytes).map_err(|e| {
            Error::invalid(
                vocab_json.display().to_string(),
                format!("expected a JSON object: {e}"),
            )
        })?;
        let merges_text = read_text(merges_txt)?;
        let mut merges = Vec::new();
        for (ln, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let Some((a, b)) = line.split_once(' ') else {
                return Err(Error::invalid(
                    format!("{}:{}", merges_txt.display(), ln + 1),
                    "expected two space-separated tokens",
                ));
            };
            merges.push(json!([a, b]));
        }
        let eot = vocab
            .get("<|endoftext|>")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let added: Vec<Value> = eot
            .iter()
            .map(|&id| added_token_json(id, "<|endoftext|>", true))
            .collect();
        let pre_tokenizer =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let inner = byte_level_bpe_json(added, Value::Null, pre_tokenizer, false, vocab, merges);
        let mut h = ContentHasher::new();
        h.field(b"gpt2");
        h.field(&vocab_bytes);
        h.field(merges_text.as_bytes());
        let mut t = Self::build(
            inner,
            TokenizerKind::Gpt2,
            h.hex(),
            eot,
            eot.into_iter().collect(),
            None,
            Some((false, false)),
        )?;
        // transformers 5 no longer cleans up tokenization spaces by default (a folder's
        // `tokenizer_config.json` can still turn it on).
        t.clean_up_tokenization_spaces = false;
        Ok(t)
    }

    /// Builds a byte-level BPE tokenizer from a GGUF vocabulary (`tokenizer.ggml.model = "gpt2"`):
    /// `tokens` (byte-level strings, index = id), `token_types` (3 = control and 4 = user-defined
    /// become added tokens), `merges` (`"a b"`) and the pre-tokenizer name `tokenizer.ggml.pre`
    /// (`llama-bpe`/`llama3` → the Llama 3 regex, `qwen2` → Qwen's with NFC, anything else → GPT-2's).
    pub fn from_gguf_bpe(
        tokens: &[String],
        token_types: &[i32],
        merges: &[String],
        pre: Option<&str>,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let mut vocab = Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(id));
            match token_types.get(id) {
                Some(3) => added.push(added_token_json(id as u32, t, true)),
                Some(4) => added.push(added_token_json(id as u32, t, false)),
                _ => {}
            }
        }
        let mut merge_list = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                return Err(Error::invalid(
                    format!("tokenizer.ggml.merges[{i}]"),
                    "expected two space-separated tokens",
                ));
            };
            merge_list.push(json!([a, b]));
        }
        let (pattern, nfc, ignore_merges) = match pre.unwrap_or("gpt2") {
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => (Some(LLAMA3_PATTERN), false, true),
            "qwen2" => (Some(QWEN2_PATTERN), true, false),
            _ => (None, false, false),
        };
        let pre_tokenizer = match pattern {
            Some(p) => regex_byte_level_pre_tokenizer(p),
            None => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
        };
        let normalizer = if nfc { json!({"type": "NFC"}) } else { Value::Null };
        let inner = byte_level_bpe_json(added, normalizer, pre_tokenizer, ignore_merges, vocab, merge_list);
        let mut h = ContentHasher::new();
        h.field(b"gguf-bpe");
        for t in tokens {
            h.field(t.as_bytes());
        }
        for m in merges {
            h.field(m.as_bytes());
        }
        h.field(pre.unwrap_or("").as_bytes());
        Self::build(
            inner,
            TokenizerKind::Gpt2,
            h.hex(),
            bos,
            eos.into_iter().collect(),
            None,
            Some((false, false)),
        )
    }

    /// Loads a model folder: `tokenizer.json` (or a tiktoken `tokenizer.model` / `*.tiktoken`, a
    /// SentencePiece `tokenizer.model`, or `vocab.json` + `merges.txt`), then applies
    /// `tokenizer_config.json` (special tokens, `add_bos_token`/`add_eos_token`, added tokens,
    /// `clean_up_tokenization_spaces`), `special_tokens_map.json` and `generation_config.json`
    /// (`eos_token_id`), and loads the chat template (see [`Tokenizer::chat_template`]).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_exists(&dir.join("special_tokens_map.json"))?;
        let generation = read_json_if_exists(&dir.join("generation_config.json"))?;
        let tj = dir.join("tokenizer.json");
        let mut tok = if tj.is_file() {
            Self::from_tokenizer_json(&tj)?
        } else if let Some(path) = find_tiktoken_file(dir) {
            let ranks = read_tiktoken_ranks(&path)?;
            let mut spec = TiktokenSpec::guess(ranks.len()).unwrap_or_else(|| TiktokenSpec {
                pattern: LLAMA3_PATTERN.to_string(),
                special_tokens: vec![],
                nfc: false,
                bos: None,
                add_bos: false,
                eos: vec![],
                pad: None,
                clean_up_tokenization_spaces: false,
            });
            if let Some(added) = config
                .as_ref()
                .and_then(|c| c.get("added_tokens_decoder"))
                .and_then(|v| v.as_object())
            {
                let mut from_config = Vec::new();
                for (id, entry) in added {
                    let (Ok(id), Some(content)) = (id.parse::<u32>(), token_string(Some(entry))) else {
                        continue;
                    };
                    let special = entry.get("special").and_then(|v| v.as_bool()).unwrap_or(true);
                    from_config.push((content, id, special));
                }
                if !from_config.is_empty() {
                    spec.special_tokens = from_config;
                }
            }
            Self::from_tiktoken_ranks(ranks, &spec)?
        } else if dir.join("tokenizer.model").is_file() {
            Self::from_sentencepiece_model(&dir.join("tokenizer.model"))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            Self::from_gpt2_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        } else {
            return Err(Error::invalid(
                dir.display().to_string(),
                "no tokenizer found: expected tokenizer.json, tokenizer.model (tiktoken ranks or SentencePiece), *.tiktoken, or vocab.json + merges.txt",
            ));
        };
        if let Some(cfg) = &config {
            tok.apply_config(cfg, dir)?;
        }
        if let Some(map) = &special_map {
            for (key, slot) in [
                ("bos_token", 0),
                ("eos_token", 1),
                ("unk_token", 2),
                ("pad_token", 3),
            ] {
                let current = match slot {
                    0 => &tok.special_tokens.bos_token,
                    1 => &tok.special_tokens.eos_token,
                    2 => &tok.special_tokens.unk_token,
                    _ => &tok.special_tokens.pad_token,
                };
                let in_config = config
                    .as_ref()
                    .map(|c| c.get(key).is_some_and(|v| !v.is_null()))
                    .unwrap_or(false);
                if current.is_some() && in_config {
                    continue;
                }
                if let Some(s) = token_string(map.get(key)) {
                    tok.set_special(key, s);
                }
            }
        }
        if let Some(g) = &generation {
            let ids: Vec<u32> = match g.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
                _ => vec![],
            };
            if !ids.is_empty() {
                let primary = tok.eos.first().copied();
                let mut merged: Vec<u32> = primary.into_iter().collect();
                for id in ids {
                    if !merged.contains(&id) {
                        merged.push(id);
                    }
                }
                tok.eos = merged;
            }
            if tok.bos.is_none()
                && let Some(b) = g.get("bos_token_id").and_then(|v| v.as_u64())
            {
                tok.bos = Some(b as u32);
            }
        }
        let mut h = ContentHasher::new();
        h.field(tok.fingerprint.as_bytes());
        for name in [
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            if let Ok(b) = std::fs::read(dir.join(name)) {
                h.field(&b);
            }
        }
        tok.fingerprint = h.hex();
        tok.chat_template = crate::template::ChatTemplate::from_model_dir(dir, &tok.special_tokens, None)?;
        Ok(tok.finalize())
    }

    fn set_special(&mut self, key: &str, s: String) {
        let id = self.token_to_id(&s);
        match key {
            "bos_token" => {
                self.bos = id;
                self.special_tokens.bos_token = Some(s);
            }
            "eos_token" => {
                if let Some(id) = id {
                    self.eos.retain(|&e| e != id);
                    self.eos.insert(0, id);
                }
                self.special_tokens.eos_token = Some(s);
            }
            "unk_token" => self.special_tokens.unk_token = Some(s),
            "pad_token" => {
                self.pad = id;
                self.special_tokens.pad_token = Some(s);
            }
            _ => {}
        }
    }

    fn apply_config(&mut self, cfg: &Value, dir: &Path) -> Result<()> {
        let place = dir.join("tokenizer_config.json").display().to_string();
        let Some(obj) = cfg.as_object() else {
            return Err(Error::invalid(place, "expected a JSON object"));
        };
        // Added tokens the tokenizer file lacks.
        if let Some(added) = obj.get("added_tokens_decoder").and_then(|v| v.as_object()) {
            let mut to_add = Vec::new();
            for (id, entry) in added {
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), token_string(Some(entry)))
                    && self.inner.token_to_id(&content).is_none()
                {
                    let special = entry.get("special").and_then(|v| v.as_bool()).unwrap_or(true);
                    to_add.push((id, content, special));
                }
            }
            if !to_add.is_empty() {
                to_add.sort();
                for (id, content, special) in to_add {
                    let tok = tokenizers::AddedToken::from(content.clone(), special).normalized(false);
                    let n = if special {
                        self.inner.add_special_tokens(&[tok])
                    } else {
                        self.inner.add_tokens(&[tok])
                    };
                    let got = self.inner.token_to_id(&content);
                    if n == 1 && got != Some(id) {
                        return Err(Error::invalid(
                            &place,
                            format!(
                                "added_tokens_decoder: token {content:?} is declared with id {id} but the vocabulary would give it {got:?}"
                            ),
                        ));
                    }
                }
                self.refresh_special_ids();
            }
        }
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            match obj.get(key) {
                Some(Value::Null) if key == "bos_token" => {
                    self.bos = None;
                    self.special_tokens.bos_token = None;
                }
                Some(Value::Null) => {}
                Some(v) => {
                    if let Some(s) = token_string(Some(v)) {
                        self.set_special(key, s);
                    }
                }
                None => {}
            }
        }
        if let Some(list) = obj.get("additional_special_tokens").and_then(|v| v.as_array()) {
            self.special_tokens.additional = list.iter().filter_map(|v| token_string(Some(v))).collect();
        }
        if let Some(c) = obj.get("clean_up_tokenization_spaces").and_then(|v| v.as_bool()) {
            self.clean_up_tokenization_spaces = c;
        }
        let add_bos = obj.get("add_bos_token").and_then(|v| v.as_bool());
        let add_eos = obj.get("add_eos_token").and_then(|v| v.as_bool());
        if add_bos.is_some() || add_eos.is_some() {
            let (cur_bos, cur_eos) = self.explicit_specials.unwrap_or_else(|| self.inner_adds());
            self.explicit_specials = Some((add_bos.unwrap_or(cur_bos), add_eos.unwrap_or(cur_eos)));
        }
        Ok(())
    }

    /// What the inner post-processor adds around a single sequence: (adds BOS, adds EOS).
    fn inner_adds(&self) -> (bool, bool) {
        self.inner_adds_cache.unwrap_or_else(|| self.measure_inner_adds())
    }

    fn finalize(mut self) -> Self {
        self.inner_adds_cache = Some(self.measure_inner_adds());
        self
    }

    fn measure_inner_adds(&self) -> (bool, bool) {
        let with = self
            .inner
            .encode("a", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        let without = self
            .inner
            .encode("a", false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        let adds_bos = with.len() > without.len() && self.bos.is_some() && with.first() == self.bos.as_ref();
        let adds_eos = with.len() > without.len() && with.last().is_some_and(|l| self.eos.contains(l));
        (adds_bos, adds_eos)
    }

    /// Encodes `text`; with `add_special_tokens` BOS/EOS are added as the tokenizer's config says.
    /// Special-token strings in the text (`<|im_end|>`) are always matched as single tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        let inner_specials = add_special_tokens && self.explicit_specials.is_none();
        let enc = self.inner.encode(text, inner_specials).map_err(tok_err)?;
        let mut out = Encoding {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        };
        if add_special_tokens && let Some((add_bos, add_eos)) = self.explicit_specials {
            if add_bos && let Some(b) = self.bos {
                out.ids.insert(0, b);
                out.offsets.insert(0, (0, 0));
            }
            if add_eos && let Some(&e) = self.eos.first() {
                out.ids.push(e);
                out.offsets.push((text.len(), text.len()));
            }
        }
        Ok(out)
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        match self.explicit_specials {
            Some((b, _)) => b && self.bos.is_some(),
            None => self.inner_adds().0,
        }
    }

    /// Whether `encode(.., true)` appends EOS.
    pub fn adds_eos(&self) -> bool {
        match self.explicit_specials {
            Some((_, e)) => e && !self.eos.is_empty(),
            None => self.inner_adds().1,
        }
    }

    /// Decodes ids to text; unknown ids are dropped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let n = self.inner.get_vocab_size(true) as u32;
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i < n || self.inner.id_to_token(i).is_some())
            .collect();
        let text = self.inner.decode(&known, skip_special_tokens).unwrap_or_default();
        if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        }
    }

    /// Decodes without `clean_up_tokenization_spaces` (what streaming needs: the text of a prefix
    /// of the ids is always a prefix of the text of all of them).
    pub fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let n = self.inner.get_vocab_size(true) as u32;
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i < n || self.inner.id_to_token(i).is_some())
            .collect();
        self.inner.decode(&known, skip_special_tokens).unwrap_or_default()
    }

    /// Whether `decode` applies transformers' `clean_up_tokenization_spaces`.
    pub fn cleans_up_tokenization_spaces(&self) -> bool {
        self.clean_up_tokenization_spaces
    }

    /// A streaming decoder of a sequence from its start (see [`IncrementalDecoder::new`]).
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            state: IncrementalDecoder::new(skip_special_tokens),
        }
    }

    /// A streaming decoder of ids that continue `prompt` (see [`IncrementalDecoder::after`]).
    pub fn decode_stream_after(&self, prompt: &[u32], skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            state: IncrementalDecoder::after(self, prompt, skip_special_tokens),
        }
    }

    /// The byte of a `<0xNN>` byte-fallback token, when the decoder has a `ByteFallback` step.
    pub fn byte_fallback_value(&self, id: u32) -> Option<u8> {
        self.byte_tokens.get(&id).copied()
    }

    /// Id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id (byte-level / `▁` form, as in the vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens (the largest id + 1 in practice).
    pub fn vocab_size(&self) -> usize {
        let base = self.inner.get_vocab_size(true);
        let max_added = self
            .inner
            .get_added_tokens_decoder()
            .keys()
            .max()
            .map(|&m| m as usize + 1)
            .unwrap_or(0);
        base.max(max_added)
    }

    /// BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence / stop ids; the first is the primary EOS from the tokenizer config, the rest
    /// come from `generation_config.json` or the format's known stop tokens.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Padding id, if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether `id` is a special token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Special-token strings for chat templates.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// The chat template found by [`Tokenizer::from_model_dir`] (`chat_template.jinja`,
    /// `chat_template.json` or `tokenizer_config.json`), if any.
    pub fn chat_template(&self) -> Option<&crate::template::ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Which format this tokenizer was built from.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// A stable fingerprint of everything that determines the encoding (for cache keys).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental decoder state that does not borrow the tokenizer (for a server task that owns an
/// `Arc<Tokenizer>`): feed ids as they are generated and get text as soon as it is final.
///
/// The concatenation of everything [`step`](Self::step) and [`finish`](Self::finish) return is
/// exactly what [`Tokenizer::decode_raw`] gives for all the ids at once (after the context, when
/// made with [`IncrementalDecoder::after`]), including Hugging Face's `ByteFallback` rule: a run
/// of `<0xNN>` byte tokens that is valid UTF-8 becomes its text, an invalid run one U+FFFD per
/// byte token. Text is held back only while it can still change:
/// - byte-fallback vocabularies (SentencePiece: Llama 2, Mistral, Phi-3, GGUF `llama`,
///   llama2.c): while a run of byte tokens is valid UTF-8 so far (a later byte could still make
///   the whole run invalid). A run is released at the first non-byte token; once a run can no
///   longer be valid, its U+FFFDs and each later byte token's U+FFFD are released at once.
/// - other vocabularies (byte-level BPE): while the text ends in U+FFFD (an incomplete UTF-8
///   sequence), for at most [`MAX_HELD_TOKENS`] tokens.
///
/// Skipped special tokens are invisible, as in `decode(.., skip_special_tokens = true)`. Each step
/// decodes a window of a few ids, never the whole sequence.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    /// The decode window: `ids[..read_offset]` were emitted already (they are context for the
    /// rest: a SentencePiece decode strips the window's leading space).
    ids: Vec<u32>,
    read_offset: usize,
    /// Bytes of the byte-token run at the end of `ids` that is valid UTF-8 so far (held back).
    run: Vec<u8>,
    /// The byte-token run at the end of `ids` is already invalid: every further byte token of it
    /// is one U+FFFD.
    run_invalid: bool,
}

/// How many tokens [`IncrementalDecoder`] holds back at most while the text ends in an
/// incomplete UTF-8 sequence (byte-level vocabularies: a character has at most 4 bytes).
pub const MAX_HELD_TOKENS: usize = 8;

/// How many trailing prompt ids [`IncrementalDecoder::after`] keeps as context.
const CONTEXT_IDS: usize = 6;

impl IncrementalDecoder {
    /// A fresh decoder: the first text is decoded as the start of a sequence (as
    /// `decode(new_ids)` would: a SentencePiece vocabulary drops the first token's leading space).
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// A decoder for ids that continue `context` (a prompt): the text returned is what the new ids
    /// add to the context's text, so a continuation keeps its leading space (`"Once upon"` →
    /// `" a time"`), as vLLM and OpenAI's completions return it. graft's `generate`, `chat` and
    /// `serve` all decode generated text this way.
    pub fn after(tokenizer: &Tokenizer, context: &[u32], skip_special_tokens: bool) -> Self {
        let visible = context
            .iter()
            .copied()
            .filter(|&id| !(skip_special_tokens && tokenizer.is_special(id)));
        let mut ids: Vec<u32> = visible.collect();
        // Trailing byte tokens (or an incomplete character) could merge with what follows: leave
        // them out of the context so the window never splits a run.
        while let Some(&last) = ids.last() {
            let dangling = if tokenizer.byte_tokens.is_empty() {
                tokenizer
                    .decode_raw(&ids, skip_special_tokens)
                    .ends_with('\u{FFFD}')
            } else {
                tokenizer.byte_tokens.contains_key(&last)
            };
            if !dangling {
                break;
            }
            ids.pop();
        }
        let keep = ids.len().saturating_sub(CONTEXT_IDS);
        ids.drain(..keep);
        IncrementalDecoder {
            skip_special_tokens,
            read_offset: ids.len(),
            ids,
            run: Vec::new(),
            run_invalid: false,
        }
    }

    /// Adds one id; returns the new text, if any is ready.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        if self.skip_special_tokens && tokenizer.is_special(id) {
            // Filtered out before decoding: it neither shows nor ends a byte run.
            return None;
        }
        if tokenizer.byte_tokens.is_empty() {
            return self.step_text(tokenizer, id);
        }
        let Some(&byte) = tokenizer.byte_tokens.get(&id) else {
            // A non-byte token ends any run: everything up to here is final.
            self.ids.push(id);
            self.run.clear();
            self.run_invalid = false;
            return self.emit(tokenizer);
        };
        if self.run_invalid {
            self.restart_after(id);
            return Some("\u{FFFD}".to_string());
        }
        self.ids.push(id);
        self.run.push(byte);
        match std::str::from_utf8(&self.run) {
            Err(e) if e.error_len().is_some() => {
                // No later byte can make this run valid: one U+FFFD per byte token, now.
                let n = self.run.len();
                self.run.clear();
                self.run_invalid = true;
                self.restart_after(id);
                Some("\u{FFFD}".repeat(n))
            }
            _ => None,
        }
    }

    /// Flushes text held back at the end of generation (an incomplete or invalid run decodes as a
    /// full decode would) and resets the decoder.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Option<String> {
        let out = self.emit(tokenizer);
        self.ids.clear();
        self.read_offset = 0;
        self.run.clear();
        self.run_invalid = false;
        out
    }

    /// Byte-level (non-`ByteFallback`) vocabularies: text is final unless it ends in U+FFFD.
    fn step_text(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let held = self.ids.len() - self.read_offset;
        let text = tokenizer.decode_raw(&self.ids, self.skip_special_tokens);
        if text.ends_with('\u{FFFD}') && held <= MAX_HELD_TOKENS {
            return None;
        }
        self.emit_from(tokenizer, text)
    }

    /// Emits what `ids[read_offset..]` add to the window's text and moves the window on.
    fn emit(&mut self, tokenizer: &Tokenizer) -> Option<String> {
        if self.read_offset == self.ids.len() {
            return None;
        }
        let text = tokenizer.decode_raw(&self.ids, self.skip_special_tokens);
        self.emit_from(tokenizer, text)
    }

    fn emit_from(&mut self, tokenizer: &Tokenizer, text: String) -> Option<String> {
        let prefix = tokenizer.decode_raw(&self.ids[..self.read_offset], self.skip_special_tokens);
        let new_text = match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // Cannot happen with the window rules above; never stall if it does.
            None => {
                let common = common_prefix_len(&prefix, &text);
                text[common..].to_string()
            }
        };
        // The new ids become the context of the next window.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        (!new_text.is_empty()).then_some(new_text)
    }

    /// After an invalid run's U+FFFDs were emitted: the window restarts at `id` (already emitted).
    fn restart_after(&mut self, id: u32) {
        self.ids.clear();
        self.ids.push(id);
        self.read_offset = 1;
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// [`IncrementalDecoder`] bound to a tokenizer: `step(id)` yields text as ids arrive, without ever
/// splitting a UTF-8 character.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    state: IncrementalDecoder,
}

impl DecodeStream<'_> {
    /// Adds one id; returns the new text, if any is ready.
    pub fn step(&mut self, id: u32) -> Option<String> {
        self.state.step(self.tokenizer, id)
    }

    /// Flushes text held back at the end of generation.
    pub fn finish(&mut self) -> Option<String> {
        self.state.finish(self.tokenizer)
    }
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and English
/// contractions that word-level detokenization leaves.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Whether a `tokenizer.json` decoder (or one step of a `Sequence`) is `ByteFallback`.
fn has_byte_fallback_step(decoder: &Value) -> bool {
    match decoder.get("type").and_then(|t| t.as_str()) {
        Some("ByteFallback") => true,
        Some("Sequence") => decoder
            .get("decoders")
            .and_then(|d| d.as_array())
            .is_some_and(|steps| steps.iter().any(has_byte_fallback_step)),
        _ => false,
    }
}

fn untrim_offsets(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("trim_offsets") {
                m.insert("trim_offsets".into(), Value::Bool(false));
            }
            for child in m.values_mut() {
                untrim_offsets(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(untrim_offsets),
        _ => {}
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::invalid(path.display().to_string(), format!("invalid JSON: {e}")))
}

fn find_tiktoken_file(dir: &Path) -> Option<std::path::PathBuf> {
    let model = dir.join("tokenizer.model");
    if model.is_file() && looks_like_tiktoken(&model) {
        return Some(model);
    }
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tiktoken"))
        .collect();
    found.sort();
    found.into_iter().next()
}

fn looks_like_tiktoken(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let head = &bytes[..bytes.len().min(256)];
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return false;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = line.split(' ');
    matches!((parts.next(), parts.next().map(|r| r.trim().parse::<u32>())), (Some(t), Some(Ok(_))) if decode_base64(t).is_some())
}

/// Reads a tiktoken rank file: one `base64(token bytes) rank` per line.
pub fn read_tiktoken_ranks(path: &Path) -> Result<Vec<(Vec<u8>, u32)>> {
    let text = read_text(path)?;
    let mut out = Vec::with_capacity(text.len() / 12);
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let place = || format!("{}:{}", path.display(), ln + 1);
        let mut parts = line.split_whitespace();
        let (Some(tok), Some(rank)) = (parts.next(), parts.next()) else {
            return Err(Error::invalid(place(), "expected `<base64 token> <rank>`"));
        };
        let bytes = decode_base64(tok).ok_or_else(|| Error::invalid(place(), "token is not valid base64"))?;
        let rank: u32 = rank
            .parse()
            .map_err(|_| Error::invalid(place(), "rank is not a non-negative integer"))?;
        out.push((bytes, rank));
    }
    Ok(out)
}

/// The parts of a SentencePiece `ModelProto` that encoding needs.
struct SentencePieceModel {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    model_type: i32,
    bos_id: i32,
    eos_id: i32,
}

/// Minimal protobuf reader over `sentencepiece_model.proto`: pieces (field 1: piece, score, type)
/// and trainer spec (field 2: model_type 3, bos_id 41, eos_id 42).
fn parse_sentencepiece_model(bytes: &[u8]) -> std::result::Result<SentencePieceModel, String> {
    fn varint(b: &[u8], pos: &mut usize) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    /// Calls `f(field, wire_type, value_bytes_or_varint)` for each field of a message.
    fn fields(
        b: &[u8],
        mut f: impl FnMut(u64, &[u8], u64) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let mut pos = 0;
        while pos < b.len() {
            let key = varint(b, &mut pos)?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    let v = varint(b, &mut pos)?;
                    f(field, &[], v)?;
                }
                1 => {
                    let s = b.get(pos..pos + 8).ok_or("truncated fixed64")?;
                    pos += 8;
                    f(field, s, 0)?;
                }
                2 => {
                    let len = varint(b, &mut pos)? as usize;
                    let s = b
                        .get(pos..pos.checked_add(len).ok_or("bad length")?)
                        .ok_or("truncated field")?;
                    pos += len;
                    f(field, s, 0)?;
                }
                5 => {
                    let s = b.get(pos..pos + 4).ok_or("truncated fixed32")?;
                    pos += 4;
                    f(field, s, 0)?;
                }
                w => {
                    return Err(format!(
                        "unsupported protobuf wire type {w}: not a SentencePiece model"
                    ));
                }
            }
        }
        Ok(())
    }
    let mut m = SentencePieceModel {
        pieces: vec![],
        scores: vec![],
        types: vec![],
        model_type: 1,
        bos_id: 1,
        eos_id: 2,
    };
    fields(bytes, |field, data, _| {
        match field {
            1 => {
                let (mut piece, mut score, mut ty) = (String::new(), 0f32, token_type::NORMAL);
                fields(data, |f, d, v| {
                    match f {
                        1 => piece = String::from_utf8_lossy(d).into_owned(),
                        2 if d.len() == 4 => score = f32::from_le_bytes([d[0], d[1], d[2], d[3]]),
                        3 => ty = v as i32,
                        _ => {}
                    }
                    Ok(())
                })?;
                m.pieces.push(piece);
                m.scores.push(score);
                m.types.push(ty);
            }
            2 => fields(data, |f, _, v| {
                match f {
                    3 => m.model_type = v as i32,
                    41 => m.bos_id = v as i64 as i32,
                    42 => m.eos_id = v as i64 as i32,
                    _ => {}
                }
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    if m.pieces.is_empty() {
        return Err("no pieces found: not a SentencePiece model".into());
    }
    Ok(m)
}

/// Parses a llama2.c tokenizer file into pieces (plain spaces) and scores.
fn parse_llama2c_vocab(bytes: &[u8]) -> std::result::Result<(Vec<String>, Vec<f32>), String> {
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let s = bytes
            .get(*pos..*pos + n)
            .ok_or_else(|| format!("truncated at byte {pos}"))?;
        *pos += n;
        Ok(s)
    };
    let word = |s: &[u8]| -> [u8; 4] { [s[0], s[1], s[2], s[3]] };
    let max_len = i32::from_le_bytes(word(take(&mut pos, 4)?));
    if !(1..=1 << 16).contains(&max_len) {
        return Err(format!(
            "max_token_length {max_len} is not plausible: not a llama2.c tokenizer file"
        ));
    }
    let mut pieces = Vec::new();
    let mut scores = Vec::new();
    while pos < bytes.len() {
        let score = f32::from_le_bytes(word(take(&mut pos, 4)?));
        let len = i32::from_le_bytes(word(take(&mut pos, 4)?));
        if len < 0 || len > max_len.max(64) * 4 {
            return Err(format!("token {} has implausible length {len}", pieces.len()));
        }
        let raw = take(&mut pos, len as usize)?;
        pieces.push(String::from_utf8_lossy(raw).into_owned());
        scores.push(score);
    }
    Ok((pieces, scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_and_decoder_are_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<IncrementalDecoder>();
        assert_send_sync::<crate::ChatTemplate>();
    }

    #[test]
    fn base64_decodes_padding_variants() {
        assert_eq!(decode_base64("IQ==").unwrap(), b"!");
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs").unwrap(), b"hel");
        assert!(decode_base64("a$").is_none());
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    fn toy_spm() -> Tokenizer {
        // <unk> <s> </s> then bytes for 'a','b' and merged pieces.
        let mut pieces = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![token_type::UNKNOWN, token_type::CONTROL, token_type::CONTROL];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..256u32 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
            scores.push(0.0);
        }
        for (p, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("ab", -4.0),
            ("▁ab", -5.0),
            ("▁a", -6.0),
        ] {
            pieces.push(p.to_string());
            types.push(token_type::NORMAL);
            scores.push(s);
        }
        Tokenizer::from_sentencepiece_vocab(pieces, scores, types, Some(1), Some(2)).unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let t = toy_spm();
        // "ab" (-4) beats "▁a" (-6): ▁ + ab → ▁ab.
        let e = t.encode("ab", true).unwrap();
        assert_eq!(e.ids, vec![1, t.token_to_id("▁ab").unwrap()]);
        assert_eq!(e.offsets[1], (0, 2));
        // 'c' is unknown → byte fallback <0x63> = 3 + 0x63.
        let e = t.encode("c", false).unwrap();
        assert_eq!(e.ids, vec![t.token_to_id("▁").unwrap(), 3 + 0x63]);
        assert_eq!(t.decode(&e.ids, false), "c");
        assert_eq!(t.decode(&[1, t.token_to_id("▁ab").unwrap(), 2], true), "ab");
        assert!(t.is_special(1) && t.is_special(2));
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2]);
    }

    #[test]
    fn sentencepiece_rejects_mismatched_lengths() {
        let err =
            Tokenizer::from_sentencepiece_vocab(vec!["a".into()], vec![], vec![], None, None).unwrap_err();
        assert!(err.to_string().contains("1 pieces but 0 scores"), "{err}");
    }

    #[test]
    fn tiktoken_ranks_merge_lowest_rank_first() {
        let mut ranks: Vec<(Vec<u8>, u32)> = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        ranks.push((b"ab".to_vec(), 256));
        ranks.push((b"bc".to_vec(), 257));
        ranks.push((b"abc".to_vec(), 258));
        let spec = TiktokenSpec {
            pattern: r"\S+|\s+".into(),
            special_tokens: vec![("<|end|>".into(), 259, true)],
            nfc: false,
            bos: None,
            add_bos: false,
            eos: vec![259],
            pad: None,
            clean_up_tokenization_spaces: false,
        };
        let t = Tokenizer::from_tiktoken_ranks(ranks, &spec).unwrap();
        assert_eq!(t.encode("abc", true).unwrap().ids, vec![258]);
        assert_eq!(t.encode("abcd", false).unwrap().ids, vec![258, b'd' as u32]);
        let e = t.encode("bcb<|end|>", false).unwrap();
        assert_eq!(e.ids, vec![257, b'b' as u32, 259]);
        assert_eq!(e.offsets, vec![(0, 2), (2, 3), (3, 10)]);
        assert_eq!(t.decode(&e.ids, true), "bcb");
        assert_eq!(t.decode(&e.ids, false), "bcb<|end|>");
    }

    #[test]
    fn decode_stream_holds_back_partial_utf8() {
        let ranks: Vec<(Vec<u8>, u32)> = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        let spec = TiktokenSpec {
            pattern: r"\S+|\s+".into(),
            special_tokens: vec![],
            nfc: false,
            bos: None,
            add_bos: false,
            eos: vec![],
            pad: None,
            clean_up_tokenization_spaces: false,
        };
        let t = Tokenizer::from_tiktoken_ranks(ranks, &spec).unwrap();
        let ids = t.encode("hé!", false).unwrap().ids;
        assert_eq!(ids.len(), 4);
        let mut s = t.decode_stream(false);
        let out: Vec<Option<String>> = ids.iter().map(|&i| s.step(i)).collect();
        assert_eq!(
            out,
            vec![Some("h".into()), None, Some("é".into()), Some("!".into())]
        );
        assert_eq!(s.finish(), None);
    }

    /// Streams `ids` through a decoder and returns the concatenated text.
    fn streamed(t: &Tokenizer, mut d: IncrementalDecoder, ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in ids {
            out.extend(d.step(t, id));
        }
        out.extend(d.finish(t));
        out
    }

    #[test]
    fn decode_stream_survives_invalid_byte_fallback_runs() {
        let t = toy_spm();
        let byte = |b: u8| 3 + b as u32;
        let (ab, a) = (t.token_to_id("▁ab").unwrap(), t.token_to_id("a").unwrap());
        // An invalid run (two lead bytes), a valid one, an invalid one (ASCII + a stray continuation
        // byte), each followed by text: nothing after it
        // may be lost, and the invalid bytes are one U+FFFD each, as HF's ByteFallback decodes.
        let ids = [
            ab,
            byte(0xE2),
            byte(0xE2),
            ab,
            a,
            byte(0xC3),
            byte(0xA9),
            ab,
            byte(0x41),
            byte(0x82),
            a,
        ];
        let full = t.decode_raw(&ids, false);
        assert_eq!(full, "ab\u{FFFD}\u{FFFD} aba\u{e9} ab\u{FFFD}\u{FFFD}a");
        assert_eq!(streamed(&t, IncrementalDecoder::new(false), &ids), full);
        // Text flows: the token after an invalid run is released at once.
        let mut d = IncrementalDecoder::new(false);
        let steps: Vec<Option<String>> = ids[..5].iter().map(|&i| d.step(&t, i)).collect();
        assert_eq!(
            steps,
            vec![
                Some("ab".into()),
                None,
                Some("\u{FFFD}\u{FFFD}".into()),
                Some(" ab".into()),
                Some("a".into())
            ]
        );
    }

    #[test]
    fn decode_stream_equals_full_decode_on_random_ids() {
        let t = toy_spm();
        let n = t.vocab_size() as u64;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..400 {
            let len = (next() % 24) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    let r = next();
                    // Mostly byte tokens (lead, continuation and ASCII bytes), some pieces and specials.
                    if r % 3 == 0 {
                        (r >> 8) as u32 % n as u32
                    } else {
                        3 + [0xE2u32, 0x82, 0xAC, 0xC3, 0xA9, 0x41, 0xF0, 0x9F][(r >> 8) as usize % 8]
                    }
                })
                .collect();
            for skip in [false, true] {
                let full = t.decode_raw(&ids, skip);
                assert_eq!(
                    streamed(&t, IncrementalDecoder::new(skip), &ids),
                    full,
                    "case {case} ids {ids:?} skip {skip}"
                );
                // Continuing a prompt that ends in a normal piece: the new text is what the ids add.
                let prompt = [1, t.token_to_id("▁ab").unwrap()];
                let mut all = prompt.to_vec();
                all.extend(&ids);
                let whole = t.decode_raw(&all, skip);
                let head = t.decode_raw(&prompt, skip);
                assert_eq!(
                    streamed(&t, IncrementalDecoder::after(&t, &prompt, skip), &ids),
                    whole[head.len()..],
                    "case {case} ids {ids:?} skip {skip}"
                );
            }
        }
    }

    #[test]
    fn continuation_keeps_its_leading_space() {
        let t = toy_spm();
        let ab = t.token_to_id("▁ab").unwrap();
        assert_eq!(streamed(&t, IncrementalDecoder::new(true), &[ab]), "ab");
        assert_eq!(
            streamed(&t, IncrementalDecoder::after(&t, &[1, ab], true), &[ab]),
            " ab"
        );
    }

    #[test]
    fn llama2c_parser_rejects_garbage() {
        assert!(parse_llama2c_vocab(&[0, 0, 0, 0]).is_err());
        assert!(parse_llama2c_vocab(&[7, 0, 0, 0, 0, 0]).is_err());
    }
}
