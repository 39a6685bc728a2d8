//! Every dataset under `shared/data/datasets` parses; bad rows are reported with their lines.

mod common;

use common::data_dir;
use graft_data::dataset::{self, DatasetFormat, LoadOptions, Record};

#[test]
fn every_shared_dataset_parses() {
    let Some(d) = data_dir() else { return };
    let root = d.join("datasets");
    let files = dataset::dataset_files(&root).unwrap();
    assert!(files.len() >= 20, "{files:?}");
    let expected = [
        ("HumanEval.jsonl.gz", DatasetFormat::PromptCompletion, 164),
        ("gsm8k/train.jsonl", DatasetFormat::PromptCompletion, 7473),
        ("math500/test.jsonl", DatasetFormat::PromptCompletion, 500),
        ("harmless-base-test.jsonl.gz", DatasetFormat::Preference, 2312),
        ("dpo_en_demo.json", DatasetFormat::Preference, 300),
        ("v1_dpo_demo.jsonl", DatasetFormat::Preference, 10),
        ("hh_rlhf_tiny.json", DatasetFormat::Preference, 1),
        ("stack_exchange_paired_tiny.json", DatasetFormat::Preference, 25),
        (
            "dolly_151_alpaca_prompt.jsonl",
            DatasetFormat::PromptCompletion,
            151,
        ),
        ("alpaca_en_demo.json", DatasetFormat::Alpaca, 999),
        ("glaive_toolcall_en_demo.json", DatasetFormat::ShareGpt, 300),
        ("identity.json", DatasetFormat::Alpaca, 91),
        ("kto_en_demo.json", DatasetFormat::Kto, 300),
        ("v1_sft_demo.jsonl", DatasetFormat::OpenAiChat, 500),
        ("toy_chat_fine_tuning.jsonl", DatasetFormat::OpenAiChat, 5),
        ("alpaca_tiny.json", DatasetFormat::Alpaca, 100),
        ("chat_tiny.json", DatasetFormat::ShareGpt, 1),
        ("tinystories_train_2MiB.txt", DatasetFormat::Text, 2317),
        ("tinystories_sample_cs336.txt", DatasetFormat::Text, 5),
        ("tinyshakespeare/input.txt", DatasetFormat::Text, 1),
        ("c4_demo.jsonl", DatasetFormat::Text, 300),
    ];
    let mut checked = 0;
    for file in &files {
        let ds = dataset::load(file, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(ds.invalid.is_empty());
        let name = file.display().to_string();
        if let Some((_, format, rows)) = expected.iter().find(|(suffix, _, _)| name.ends_with(suffix)) {
            assert_eq!(ds.formats[0].1, *format, "{name}");
            assert_eq!(ds.rows.len(), *rows, "{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len());
    // A whole folder loads too.
    let sft = dataset::load(&root.join("sft/llamafactory"), &LoadOptions::default()).unwrap();
    assert_eq!(sft.formats.len(), 5);
}

#[test]
fn typed_records_keep_tools_weights_and_prompts() {
    let Some(d) = data_dir() else { return };
    let ds = |p: &str| dataset::load(&d.join("datasets").join(p), &LoadOptions::default()).unwrap();
    let glaive = ds("sft/llamafactory/glaive_toolcall_en_demo.json");
    let with_call = glaive
        .rows
        .iter()
        .find_map(|r| match &r.record {
            Record::Chat(c) if c.messages.iter().any(|m| m.extra.contains_key("tool_calls")) => {
                Some(c.clone())
            }
            _ => None,
        })
        .expect("a conversation with a tool call");
    assert!(
        with_call
            .tools
            .as_ref()
            .is_some_and(|t| t[0]["type"] == "function")
    );
    assert!(with_call.messages.iter().any(|m| m.role == "tool"));
    let v1 = ds("sft/llamafactory/v1_sft_demo.jsonl");
    let Record::Chat(c) = &v1.rows[0].record else {
        panic!()
    };
    assert_eq!(c.weights, vec![Some(0.0), Some(1.0)]);
    assert_eq!(c.messages[0].content, serde_json::json!("hi"));
    let hh = ds("preference/hh-rlhf/harmless-base-test.jsonl.gz");
    for row in &hh.rows {
        let Record::Preference(p) = &row.record else {
            panic!()
        };
        let graft_data::Turns::Text(prompt) = &p.prompt else {
            panic!()
        };
        assert!(prompt.ends_with("Assistant:"), "line {}: {prompt:?}", row.line);
    }
}

#[test]
fn openai_toy_file_reports_faulty_rows_with_lines() {
    let Some(d) = data_dir() else { return };
    let path = d.join("datasets/sft/openai-cookbook/toy_chat_fine_tuning.jsonl");
    let ds = dataset::load(&path, &LoadOptions::default()).unwrap();
    let warned: Vec<(usize, String)> = ds
        .rows
        .iter()
        .flat_map(|r| r.warnings.iter().map(move |w| (r.line, w.clone())))
        .collect();
    assert!(
        warned
            .iter()
            .any(|(l, w)| *l == 3 && w.contains("no system message")),
        "{warned:?}"
    );
    assert!(
        warned
            .iter()
            .any(|(l, w)| *l == 4 && w.contains("no user message")),
        "{warned:?}"
    );
    assert!(!warned.iter().any(|(l, _)| *l == 1 || *l == 2), "{warned:?}");
}

#[test]
fn invalid_rows_error_by_default_and_skip_on_request() {
    let dir = std::env::temp_dir().join(format!("graft-data-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"robot\", \"content\": \"b\"}]}\n\
         not json\n\
         {\"messages\": \"oops\"}\n",
    )
    .unwrap();
    let err = dataset::load(&path, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2: messages[1].role: expected one of"),
        "{err}"
    );
    let ds = dataset::load(
        &path,
        &LoadOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.rows.len(), 1);
    let lines: Vec<usize> = ds.invalid.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![2, 3, 4]);
    assert!(
        ds.invalid[1].to_string().contains("bad.jsonl:3: invalid JSON"),
        "{}",
        ds.invalid[1]
    );
    assert!(
        ds.invalid[2]
            .reason
            .contains("messages: expected a list of messages"),
        "{}",
        ds.invalid[2]
    );
    // A .json array names the line where the bad element starts.
    let arr = dir.join("bad.json");
    std::fs::write(
        &arr,
        "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": 3, \"output\": \"b\"}\n]",
    )
    .unwrap();
    let err = dataset::load(&arr, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.json:3: instruction: expected a string"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
