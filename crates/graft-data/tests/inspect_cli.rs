//! `graft data inspect` end to end: the CLI module of the `graft` binary, driven through clap.

mod common;
#[path = "../../graft/src/data_cmd.rs"]
#[allow(dead_code)]
mod data_cmd;

use clap::Parser;
use common::data_dir;
use graft_data::inspect::{InspectOptions, inspect};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: data_cmd::DataInspectArgs,
}

#[test]
fn inspect_openai_toy_file_lists_faulty_rows() {
    let Some(d) = data_dir() else { return };
    let model = d.join("tokenizers/qwen2.5");
    let file = d.join("datasets/sft/openai-cookbook/toy_chat_fine_tuning.jsonl");
    let (tok, template) = graft_data::load_tokenizer_and_template(&model).unwrap();
    let report = inspect(
        &file,
        &tok,
        template.as_ref(),
        &InspectOptions {
            max_len: 1024,
            ..Default::default()
        },
    )
    .unwrap();
    let text = report.to_string();
    eprintln!("{text}");
    assert_eq!(report.rows, 5);
    assert!(text.contains("format:   openai"), "{text}");
    assert!(
        text.contains("toy_chat_fine_tuning.jsonl:3: no system message"),
        "{text}"
    );
    assert!(
        text.contains("toy_chat_fine_tuning.jsonl:4: no user message"),
        "{text}"
    );
    assert!(text.contains("toy_chat_fine_tuning.jsonl:5: "), "{text}");
    assert_eq!(report.truncated.len(), 1);
    assert_eq!(report.truncated[0].line, 5);
    assert!(
        text.contains("[[It's great that you're getting exercise outdoors!<|im_end|>]]"),
        "{text}"
    );
    assert!(report.trained_fraction() > 0.0 && report.trained_fraction() < 1.0);
    assert!(text.contains("length histogram"), "{text}");
}

#[test]
fn cli_args_parse_and_invalid_rows_fail_unless_skipped() {
    let Some(d) = data_dir() else { return };
    let dir = std::env::temp_dir().join(format!("graft-inspect-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rows.jsonl");
    std::fs::write(&file, "{\"text\": \"Once upon a time\"}\n{\"text\": 5}\n").unwrap();
    let model = d.join("models/stories260K/stories260K.bin");
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "inspect",
            file.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--max-len",
            "64",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    };
    let (tok, template) = graft_data::load_tokenizer_and_template(&model).unwrap();
    let err = data_cmd::run_inspect(&parse(&[]), tok.clone(), template.clone()).unwrap_err();
    assert!(err.to_string().contains("1 invalid row(s)"), "{err}");
    data_cmd::run_inspect(
        &parse(&["--skip-invalid", "--format", "text"]),
        tok.clone(),
        template.clone(),
    )
    .unwrap();
    assert!(Cli::try_parse_from(["inspect", "x", "--model", "m", "--format", "nope"]).is_err());
    let report = inspect(&file, &tok, None, &InspectOptions::default()).unwrap();
    assert_eq!(report.invalid.len(), 1);
    assert!(
        report
            .to_string()
            .contains("rows.jsonl:2: text: expected a string, got a number"),
        "{report}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_text_reports_splits_and_plain_text_loss() {
    let Some(d) = data_dir() else { return };
    let (tok, template) =
        graft_data::load_tokenizer_and_template(&d.join("models/stories260K/stories260K.bin")).unwrap();
    let file = d.join("datasets/text/tinystories/tinystories_sample_cs336.txt");
    let opts = InspectOptions {
        max_len: 64,
        ..Default::default()
    };
    let report = inspect(&file, &tok, template.as_ref(), &opts).unwrap();
    let text = report.to_string();
    assert_eq!(report.rows, 5);
    assert!(report.truncated.is_empty());
    assert_eq!(report.split_rows, 5);
    assert!(text.contains("loss on all tokens (plain text)"), "{text}");
    assert!(text.contains("split:    5 long text row(s)"), "{text}");
    assert!(text.contains("<s>[[Once upon a time"), "{text}");
}
