//! Streaming detokenization on real SentencePiece (byte-fallback) vocabularies from
//! `shared/data`: what the stream emits, concatenated, equals a full decode of the ids, including
//! invalid UTF-8 byte runs, and text after such a run is never lost.

mod common;

use common::data_dir;
use graft_data::{IncrementalDecoder, Tokenizer};

fn streamed(t: &Tokenizer, mut d: IncrementalDecoder, ids: &[u32]) -> String {
    let mut out = String::new();
    for &id in ids {
        out.extend(d.step(t, id));
    }
    out.extend(d.finish(t));
    out
}

/// Encodes text that needs byte fallback, then splices in invalid byte runs, and checks the
/// stream against the full decode (skipping specials and not).
fn check_vocabulary(name: &str, t: &Tokenizer) {
    let byte = |b: u8| {
        t.token_to_id(&format!("<0x{b:02X}>"))
            .unwrap_or_else(|| panic!("{name}: no byte token <0x{b:02X}>"))
    };
    assert_eq!(t.byte_fallback_value(byte(0xE2)), Some(0xE2), "{name}");
    let text = "Once upon a time 🦀 a crab said 你好, then ∑ and é.";
    let ids = t.encode(text, true).unwrap().ids;
    assert_eq!(
        streamed(t, IncrementalDecoder::new(true), &ids),
        t.decode_raw(&ids, true),
        "{name}"
    );
    let mut broken = ids.clone();
    // A truncated 3-byte sequence, a stray continuation byte, an emoji cut after two bytes.
    for (at, run) in [
        (3, vec![0xE2, 0x82]),
        (6, vec![0x82]),
        (9, vec![0xF0, 0x9F, 0x41, 0x41]),
    ] {
        let at = at.min(broken.len());
        broken.splice(at..at, run.into_iter().map(byte));
    }
    let eos = t.eos_ids()[0];
    broken.insert(broken.len() / 2, eos);
    for skip in [true, false] {
        let full = t.decode_raw(&broken, skip);
        assert!(full.contains('\u{FFFD}'), "{name}");
        let got = streamed(t, IncrementalDecoder::new(skip), &broken);
        assert_eq!(got, full, "{name}: skip_special_tokens = {skip}");
        assert!(
            got.ends_with("é."),
            "{name}: text after the invalid runs was lost: {got:?}"
        );
    }
    // Generated text after a prompt: what the new ids add to the prompt's text.
    let (prompt, new) = broken.split_at(4);
    let whole = t.decode_raw(&broken, true);
    let head = t.decode_raw(prompt, true);
    assert_eq!(
        streamed(t, IncrementalDecoder::after(t, prompt, true), new),
        whole[head.len()..],
        "{name}"
    );
}

#[test]
fn stream_decoding_matches_full_decode_on_sentencepiece_vocabularies() {
    let Some(d) = data_dir() else { return };
    let llama2c = Tokenizer::from_llama2c_file(&d.join("models/stories260K/tok512.bin")).unwrap();
    check_vocabulary("stories260K tok512.bin", &llama2c);
    let mistral =
        Tokenizer::from_sentencepiece_model(&d.join("tokenizers/mistral/tokenizer.model.v1")).unwrap();
    check_vocabulary("mistral tokenizer.model.v1", &mistral);
    let phi3 = Tokenizer::from_model_dir(&d.join("tokenizers/phi-3-mini")).unwrap();
    check_vocabulary("phi-3-mini tokenizer.json", &phi3);
}
