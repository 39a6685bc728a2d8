//! Loss masks derived from real templates and tokenizers.

mod common;

use common::data_dir;
use graft_data::dataset::{Conversation, Record};
use graft_data::sample::{self, LossMode, MissingEndOfTurn, TokenizeOptions};
use graft_data::{
    ChatTemplate, Message, SpecialTokens, TiktokenSpec, TokenizedRecord, TokenizedSample, Tokenizer,
};

fn conversation(weights: Vec<Option<f32>>) -> Record {
    Record::Chat(Conversation {
        messages: vec![
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "Hello, how are you?"),
            Message::new("assistant", "I'm doing great. How can I help you today?"),
            Message::new("user", "Tell me a joke."),
            Message::new("assistant", "Why did the chicken cross the road?"),
        ],
        weights,
        tools: None,
    })
}

fn single(r: Option<TokenizedRecord>) -> TokenizedSample {
    match r.unwrap() {
        TokenizedRecord::Single(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Runs of trained tokens, decoded.
fn trained_runs(tok: &Tokenizer, s: &TokenizedSample) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (i, &id) in s.input_ids.iter().enumerate() {
        if s.trained[i] {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false));
    }
    runs
}

#[test]
fn qwen25_trains_assistant_content_and_im_end_only() {
    let Some(d) = data_dir() else { return };
    let (tok, template) = common::qwen(&d);
    let template = template.as_ref().expect("qwen2.5 has a chat template");
    let s = single(
        sample::tokenize_record(
            &conversation(vec![]),
            tok,
            Some(template),
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(
        trained_runs(tok, &s),
        vec![
            "I'm doing great. How can I help you today?<|im_end|>",
            "Why did the chicken cross the road?<|im_end|>"
        ]
    );
    assert_eq!(s.notes, Default::default());
    // Nothing before the first assistant content is trained, and the newline after <|im_end|> is not.
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    for (i, &id) in s.input_ids.iter().enumerate() {
        if id == im_end && i + 1 < s.input_ids.len() {
            assert!(!s.trained[i + 1]);
        }
    }
    // Weight 0 on the first assistant turn; last-assistant mode; all tokens.
    let w = single(
        sample::tokenize_record(
            &conversation(vec![None, None, Some(0.0), None, None]),
            tok,
            Some(template),
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(
        trained_runs(tok, &w),
        vec!["Why did the chicken cross the road?<|im_end|>"]
    );
    let opts = TokenizeOptions {
        loss: LossMode::LastAssistant,
        ..Default::default()
    };
    let l = single(sample::tokenize_record(&conversation(vec![]), tok, Some(template), &opts).unwrap());
    assert_eq!(l.trained, w.trained);
    let opts = TokenizeOptions {
        loss: LossMode::AllTokens,
        ..Default::default()
    };
    let a = single(sample::tokenize_record(&conversation(vec![]), tok, Some(template), &opts).unwrap());
    let untrained: Vec<usize> = (0..a.trained.len()).filter(|&i| !a.trained[i]).collect();
    assert_eq!(untrained, vec![0]);
}

#[test]
fn llama3_single_bos_and_eot_trained() {
    let Some(d) = data_dir() else { return };
    let tok = Tokenizer::from_tiktoken_file(
        &d.join("tokenizers/llama3/tokenizer.model"),
        &TiktokenSpec::llama3(),
    )
    .unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("chat_templates/mistral.rs/llama3.json")).unwrap(),
    )
    .unwrap();
    let special = SpecialTokens {
        bos_token: Some("<|begin_of_text|>".into()),
        eos_token: Some("<|eot_id|>".into()),
        ..Default::default()
    };
    let template = ChatTemplate::new(cfg["chat_template"].as_str().unwrap(), special).unwrap();
    let s = single(
        sample::tokenize_record(
            &conversation(vec![]),
            &tok,
            Some(&template),
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(s.input_ids[0], 128000);
    assert_ne!(s.input_ids[1], 128000);
    assert_eq!(
        trained_runs(&tok, &s),
        vec![
            "I'm doing great. How can I help you today?<|eot_id|>",
            "Why did the chicken cross the road?<|eot_id|>"
        ]
    );
    // The rendered text equals a fresh encode of the template output.
    let text = template
        .render_text(
            match &conversation(vec![]) {
                Record::Chat(c) => &c.messages,
                _ => unreachable!(),
            },
            None,
            false,
            &Default::default(),
        )
        .unwrap();
    assert_eq!(tok.encode(&text, false).unwrap().ids, s.input_ids);
}

#[test]
fn phi3_end_token_trained_and_no_bos_added() {
    let Some(d) = data_dir() else { return };
    let (tok, template) = graft_data::load_tokenizer_and_template(&d.join("tokenizers/phi-3-mini")).unwrap();
    let template = template.unwrap();
    let s = single(
        sample::tokenize_record(
            &conversation(vec![]),
            &tok,
            Some(&template),
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    let runs = trained_runs(&tok, &s);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[0].ends_with("today?<|end|>"), "{runs:?}");
    // The template closes the conversation with eos_token right after the last turn.
    assert!(runs[1].ends_with("road?<|end|><|endoftext|>"), "{runs:?}");
    assert!(
        !runs
            .iter()
            .any(|r| r.contains("<|user|>") || r.contains("<|assistant|>"))
    );
}

#[test]
fn template_without_end_of_turn_gets_eos_and_report() {
    let Some(d) = data_dir() else { return };
    let tok = Tokenizer::from_model_dir(&d.join("models/stories260K/hf")).unwrap();
    let template = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
        tok.special_tokens().clone(),
    )
    .unwrap();
    let s = single(
        sample::tokenize_record(
            &conversation(vec![]),
            &tok,
            Some(&template),
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(s.notes.appended_eos, 2);
    assert_eq!(s.input_ids[0], 1);
    let eos_positions: Vec<usize> = (0..s.input_ids.len()).filter(|&i| s.input_ids[i] == 2).collect();
    assert_eq!(eos_positions.len(), 2);
    assert!(eos_positions.iter().all(|&i| s.trained[i]));
    // Training ids are the serving ids: exactly the rendered text encoded without special tokens.
    let no_bos = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        tok.special_tokens().clone(),
    )
    .unwrap();
    let opts = TokenizeOptions {
        missing_end_of_turn: MissingEndOfTurn::Report,
        ..Default::default()
    };
    let s2 = single(sample::tokenize_record(&conversation(vec![]), &tok, Some(&no_bos), &opts).unwrap());
    let Record::Chat(c) = conversation(vec![]) else {
        unreachable!()
    };
    let served = tok
        .encode(
            &no_bos
                .render_text(&c.messages, None, false, &Default::default())
                .unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(s2.input_ids, served.ids);
    assert_ne!(s2.input_ids[0], 1);
    let opts = TokenizeOptions {
        missing_end_of_turn: MissingEndOfTurn::Report,
        ..Default::default()
    };
    let r = single(sample::tokenize_record(&conversation(vec![]), &tok, Some(&template), &opts).unwrap());
    assert_eq!(r.notes.missing_end_of_turn, 2);
    assert!(!r.input_ids.contains(&2));
}

#[test]
fn doubled_bos_is_collapsed_and_prompt_not_trained() {
    let Some(d) = data_dir() else { return };
    let tok = Tokenizer::from_llama2c_file(&d.join("models/stories260K/tok512.bin")).unwrap();
    let s = single(
        sample::tokenize_record(
            &Record::Text("<s>Once upon a time".into()),
            &tok,
            None,
            &TokenizeOptions::default(),
        )
        .unwrap(),
    );
    assert!(s.notes.bos_deduplicated);
    assert_eq!(s.input_ids.iter().filter(|&&i| i == 1).count(), 1);
    assert_eq!(*s.input_ids.last().unwrap(), 2);
    let pc = Record::PromptCompletion {
        prompt: graft_data::Turns::Text("Once upon".into()),
        completion: graft_data::Turns::Text(" a time".into()),
    };
    let s = single(sample::tokenize_record(&pc, &tok, None, &TokenizeOptions::default()).unwrap());
    let prompt_len = tok.encode("Once upon", true).unwrap().ids.len();
    assert!(s.trained[..prompt_len].iter().all(|&t| !t));
    assert!(s.trained[prompt_len..].iter().all(|&t| t));
    assert_eq!(*s.input_ids.last().unwrap(), 2);
    // Truncation keeps the start by default and records it.
    let opts = TokenizeOptions {
        max_len: Some(3),
        ..Default::default()
    };
    let t = single(sample::tokenize_record(&pc, &tok, None, &opts).unwrap());
    assert_eq!(t.input_ids.len(), 3);
    assert!(t.notes.truncated);
    let opts = TokenizeOptions {
        max_len: Some(3),
        truncation: graft_data::Truncation::DropRow,
        ..Default::default()
    };
    assert!(sample::tokenize_record(&pc, &tok, None, &opts).unwrap().is_none());
}

/// Across every template of the rendered goldens: trained bytes are exactly assistant text (plus
/// end-of-turn markers), never system or user text.
#[test]
fn no_prompt_text_is_trained_for_any_golden_template() {
    let Some(d) = data_dir() else { return };
    let (tok, _) = common::qwen(&d);
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("chat_templates/rendered_goldens.json")).unwrap(),
    )
    .unwrap();
    let record = Record::Chat(Conversation {
        messages: vec![
            Message::new("user", "Alpha question?"),
            Message::new("assistant", "Bravo answer."),
            Message::new("user", "Charlie question?"),
            Message::new("assistant", "Delta answer."),
        ],
        weights: vec![],
        tools: None,
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut checked = 0;
    for case in goldens["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let source = case["template_source"].as_str().unwrap();
        if !seen.insert(name.to_string()) || source.contains("ollama") {
            continue;
        }
        let text = std::fs::read_to_string(d.join(source)).unwrap();
        let src = if source.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["chat_template"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            text
        };
        let st = &case["special_tokens"];
        let special = SpecialTokens {
            bos_token: st["bos_token"].as_str().map(String::from),
            eos_token: st["eos_token"].as_str().map(String::from),
            ..Default::default()
        };
        let template = ChatTemplate::new(&src, special)
            .unwrap()
            .with_fixed_date_text("26 Jul 2024")
            .unwrap();
        let built = sample::build_record(&record, tok, Some(&template), &TokenizeOptions::default()).unwrap();
        let seq = &built[0];
        let mut trained_text = String::new();
        for (i, &(s, e)) in seq.offsets.iter().enumerate() {
            if seq.trained[i] && e > s {
                trained_text.push_str(&seq.text[s..e]);
            }
        }
        for prompt in ["Alpha", "question", "Charlie", "user", "<|im_start|>"] {
            assert!(
                !trained_text.contains(prompt),
                "{name}: {prompt:?} trained in {trained_text:?}"
            );
        }
        for answer in ["Bravo answer.", "Delta answer."] {
            assert!(
                trained_text.contains(answer),
                "{name}: {answer:?} not trained in {trained_text:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}
