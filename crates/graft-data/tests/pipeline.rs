//! Dataset → tokens (cached) → packed batches, on real files.

mod common;

use common::data_dir;
use graft_data::batch::{IGNORE_INDEX, pack};
use graft_data::dataset::LoadOptions;
use graft_data::sample::TokenizeOptions;
use graft_data::{TokenizedRecord, load_tokenized};

#[test]
fn tokenization_is_cached_by_content_and_options() {
    let Some(d) = data_dir() else { return };
    let (tok, template) = common::qwen(&d);
    let cache = std::env::temp_dir().join(format!("graft-data-cache-{}", std::process::id()));
    let path = d.join("datasets/sft/torchtune/alpaca_tiny.json");
    let opts = TokenizeOptions {
        max_len: Some(256),
        ..Default::default()
    };
    let load = LoadOptions::default();
    let first = load_tokenized(&path, &load, tok, template.as_ref(), &opts, Some(&cache)).unwrap();
    assert!(!first.from_cache);
    assert_eq!(first.examples.len(), 100);
    let second = load_tokenized(&path, &load, tok, template.as_ref(), &opts, Some(&cache)).unwrap();
    assert!(second.from_cache);
    assert_eq!(first.examples, second.examples);
    let other = TokenizeOptions {
        max_len: Some(128),
        ..Default::default()
    };
    let third = load_tokenized(&path, &load, tok, template.as_ref(), &other, Some(&cache)).unwrap();
    assert!(!third.from_cache);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn packed_tinystories_batches_keep_sequences_isolated() {
    let Some(d) = data_dir() else { return };
    let (tok, _) =
        graft_data::load_tokenizer_and_template(&d.join("models/stories260K/stories260K.bin")).unwrap();
    let path = d.join("datasets/text/tinystories/tinystories_sample_cs336.txt");
    let ds = load_tokenized(
        &path,
        &LoadOptions::default(),
        &tok,
        None,
        &TokenizeOptions::default(),
        None,
    )
    .unwrap();
    let samples = ds.singles();
    assert_eq!(samples.len(), 5);
    for s in &samples {
        assert_eq!(s.input_ids[0], 1);
        assert_eq!(*s.input_ids.last().unwrap(), 2);
        assert!(s.trained[1..].iter().all(|&t| t));
    }
    let budget = samples.iter().map(|s| s.input_ids.len()).max().unwrap() + 50;
    let (batches, stats) = pack(&samples, budget, 1234, 0).unwrap();
    assert_eq!(stats.samples, 5);
    let mut seen = 0;
    for b in &batches {
        assert!(b.len() <= budget);
        for t in 0..b.len() {
            let first_of_seq = t == 0 || b.seq_ids[t] != b.seq_ids[t - 1];
            assert_eq!(first_of_seq, b.positions[t] == 0);
            if first_of_seq {
                assert_eq!(b.input_ids[t], 1);
                seen += 1;
            }
            let last_of_seq = t + 1 == b.len() || b.seq_ids[t + 1] != b.seq_ids[t];
            if last_of_seq {
                assert_eq!(b.targets[t], IGNORE_INDEX);
            } else {
                assert_eq!(b.targets[t], b.input_ids[t + 1] as i32);
            }
        }
    }
    assert_eq!(seen, 5);
    // Same seed, same batches; the sum of targets equals the trained tokens.
    let (again, _) = pack(&samples, budget, 1234, 0).unwrap();
    assert_eq!(batches, again);
    let targets: usize = batches.iter().map(|b| b.target_count()).sum();
    assert_eq!(targets, samples.iter().map(|s| s.trained_count()).sum::<usize>());
}

#[test]
fn preference_and_kto_rows_tokenize_with_shared_prompts() {
    let Some(d) = data_dir() else { return };
    let (tok, template) = common::qwen(&d);
    let opts = TokenizeOptions::default();
    let dpo = load_tokenized(
        &d.join("datasets/preference/llamafactory/dpo_en_demo.json"),
        &LoadOptions::default(),
        tok,
        template.as_ref(),
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(dpo.examples.len(), 300);
    for e in &dpo.examples {
        let TokenizedRecord::Pair { chosen, rejected, .. } = &e.record else {
            panic!()
        };
        let prompt_c = chosen.trained.iter().position(|&t| t).unwrap();
        let prompt_r = rejected.trained.iter().position(|&t| t).unwrap();
        assert_eq!(
            chosen.input_ids[..prompt_c.min(prompt_r)],
            rejected.input_ids[..prompt_c.min(prompt_r)],
            "line {}",
            e.line
        );
        assert_eq!(
            *chosen.input_ids.last().unwrap(),
            tok.token_to_id("\n").unwrap_or(198)
        );
    }
    let kto = load_tokenized(
        &d.join("datasets/sft/llamafactory/kto_en_demo.json"),
        &LoadOptions::default(),
        tok,
        template.as_ref(),
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(kto.examples.len(), 300);
    assert!(
        kto.examples
            .iter()
            .any(|e| matches!(e.record, TokenizedRecord::Kto { label: false, .. }))
    );
    let hh = load_tokenized(
        &d.join("datasets/preference/hh-rlhf/harmless-base-test.jsonl.gz"),
        &LoadOptions::default(),
        tok,
        None,
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(hh.examples.len(), 2312);
}

#[test]
fn long_text_rows_are_split_into_chunks_not_truncated() {
    let Some(d) = data_dir() else { return };
    let (tok, _) = graft_data::load_tokenizer_and_template(&d.join("models/stories260K/hf")).unwrap();
    let path = d.join("datasets/text/tinyshakespeare/input.txt");
    let opts = TokenizeOptions {
        max_len: Some(512),
        ..Default::default()
    };
    let ds = load_tokenized(&path, &LoadOptions::default(), &tok, None, &opts, None).unwrap();
    assert_eq!(ds.examples.len(), 1);
    let TokenizedRecord::Chunks(chunks) = &ds.examples[0].record else {
        panic!("expected chunks")
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let mut full = tok.encode(&text, true).unwrap().ids;
    full.push(2);
    let joined: Vec<u32> = chunks.iter().flat_map(|c| c.input_ids.iter().copied()).collect();
    assert_eq!(joined, full);
    assert!(
        chunks
            .iter()
            .all(|c| c.input_ids.len() <= 512 && !c.trained[0] && c.trained[1..].iter().all(|&t| t))
    );
    assert_eq!(ds.singles().len(), chunks.len());
    // Dropping instead of splitting is still available.
    let drop = TokenizeOptions {
        truncation: graft_data::Truncation::DropRow,
        ..opts
    };
    let ds = load_tokenized(&path, &LoadOptions::default(), &tok, None, &drop, None).unwrap();
    assert!(ds.examples.is_empty());
    assert_eq!(ds.dropped_too_long, vec![(0, 1)]);
}
