//! Validation of an uploaded fine-tuning file: JSON lines in one of OpenAI's three formats, at
//! least [`MIN_EXAMPLES`] of them. Each row is parsed by the same code the trainers read it
//! with ([`graft_data::dataset::parse_row`]), so a file that uploads is a file that trains; an
//! error names the line and the field.

use crate::JobsError;
use graft_data::dataset::{DatasetFormat, parse_messages, parse_row};
use serde_json::Value;

/// Fewest examples a training file may hold (OpenAI's minimum).
pub const MIN_EXAMPLES: u64 = 10;

/// What a file trains: the method whose format its rows have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `{"messages": [... assistant ...], "tools"?}`: supervised fine-tuning.
    Supervised,
    /// `{"input": {"messages"}, "preferred_output", "non_preferred_output"}`: DPO.
    Dpo,
    /// `{"messages": [... ending with the prompt], other fields for the grader}`: reinforcement.
    Reinforcement,
}

impl FileKind {
    /// The name stored with the file, as OpenAI names the method.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Supervised => "supervised",
            FileKind::Dpo => "dpo",
            FileKind::Reinforcement => "reinforcement",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            FileKind::Supervised => {
                "a supervised (chat) example: {\"messages\": [...]} ending with an assistant message"
            }
            FileKind::Dpo => {
                "a DPO example: {\"input\": {\"messages\"}, \"preferred_output\", \"non_preferred_output\"}"
            }
            FileKind::Reinforcement => {
                "a reinforcement example: {\"messages\": [...]} ending with the user's prompt, plus the grader's fields"
            }
        }
    }
}

/// What validation found in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileFacts {
    /// The format of its rows.
    pub kind: FileKind,
    /// Examples it holds.
    pub examples: u64,
}

fn invalid_file(message: String) -> JobsError {
    JobsError::invalid("file", message).with_code("invalid_file_format")
}

/// The kind one row looks like, from its keys.
fn row_kind(obj: &serde_json::Map<String, Value>) -> Option<FileKind> {
    if obj.contains_key("preferred_output") || obj.contains_key("non_preferred_output") {
        return Some(FileKind::Dpo);
    }
    let last_role = obj.get("messages")?.as_array()?.last()?.get("role")?.as_str()?;
    Some(if last_role == "assistant" {
        FileKind::Supervised
    } else {
        FileKind::Reinforcement
    })
}

fn check_row(v: &Value, kind: FileKind) -> Result<(), String> {
    match kind {
        FileKind::Supervised => parse_row(v, DatasetFormat::OpenAiChat).map(|_| ()),
        FileKind::Dpo => parse_row(v, DatasetFormat::Preference).map(|_| ()),
        FileKind::Reinforcement => {
            let m = v.get("messages").ok_or("missing \"messages\"")?;
            let (messages, _) = parse_messages(m, "messages")?;
            match messages.last() {
                Some(last) if last.role == "assistant" => Err(format!(
                    "messages[{}]: the last message of a reinforcement example is the prompt the model answers; \
                     it must not be an assistant message",
                    messages.len() - 1
                )),
                _ => Ok(()),
            }
        }
    }
}

/// Validates a fine-tuning file's bytes; the error names the line (1-based) and field.
pub fn validate_fine_tune_file(bytes: &[u8]) -> Result<FileFacts, JobsError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        invalid_file(format!(
            "Invalid file format. Line {line}: the file is not UTF-8 text."
        ))
    })?;
    let mut kind = None;
    let mut examples = 0u64;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            invalid_file(format!(
                "Invalid file format. Line {n}: not valid JSON ({e}); a fine-tuning file holds one JSON object per line."
            ))
        })?;
        let Some(obj) = v.as_object() else {
            return Err(invalid_file(format!(
                "Invalid file format. Line {n}: expected a JSON object, got {}.",
                short(&v)
            )));
        };
        let Some(k) = row_kind(obj) else {
            return Err(invalid_file(format!(
                "Invalid file format. Line {n}: expected {}, {} or {}; the object has keys {:?}.",
                FileKind::Supervised.describe(),
                FileKind::Dpo.describe(),
                FileKind::Reinforcement.describe(),
                obj.keys().collect::<Vec<_>>()
            )));
        };
        match kind {
            None => kind = Some(k),
            Some(first) if first != k => {
                return Err(invalid_file(format!(
                    "Invalid file format. Line {n}: this is {} but the file's first example is {}; a file holds one format.",
                    k.describe(),
                    first.describe()
                )));
            }
            Some(_) => {}
        }
        check_row(&v, k).map_err(|e| invalid_file(format!("Invalid file format. Line {n}, {e}.")))?;
        examples += 1;
    }
    let Some(kind) = kind else {
        return Err(invalid_file(
            "Invalid file format. The file holds no examples.".into(),
        ));
    };
    if examples < MIN_EXAMPLES {
        return Err(invalid_file(format!(
            "Training file has {examples} example(s), but must have at least {MIN_EXAMPLES} examples."
        )));
    }
    Ok(FileFacts { kind, examples })
}

fn short(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(rows: &[Value]) -> Vec<u8> {
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    }

    fn chat(i: usize) -> Value {
        json!({"messages": [{"role": "user", "content": format!("q{i}")}, {"role": "assistant", "content": "a"}]})
    }

    #[test]
    fn kinds_and_counts() {
        let rows: Vec<Value> = (0..12).map(chat).collect();
        let f = validate_fine_tune_file(&lines(&rows)).unwrap();
        assert_eq!(
            f,
            FileFacts {
                kind: FileKind::Supervised,
                examples: 12
            }
        );
        let dpo: Vec<Value> = (0..10)
            .map(|i| {
                json!({"input": {"messages": [{"role": "user", "content": format!("q{i}")}]},
                       "preferred_output": [{"role": "assistant", "content": "good"}],
                       "non_preferred_output": [{"role": "assistant", "content": "bad"}]})
            })
            .collect();
        assert_eq!(validate_fine_tune_file(&lines(&dpo)).unwrap().kind, FileKind::Dpo);
        let rft: Vec<Value> = (0..10)
            .map(|i| json!({"messages": [{"role": "user", "content": format!("q{i}")}], "answer": "4"}))
            .collect();
        assert_eq!(
            validate_fine_tune_file(&lines(&rft)).unwrap().kind,
            FileKind::Reinforcement
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let mut rows: Vec<Value> = (0..12).map(chat).collect();
        rows[4] =
            json!({"messages": [{"role": "usr", "content": "x"}, {"role": "assistant", "content": "y"}]});
        let e = validate_fine_tune_file(&lines(&rows)).unwrap_err();
        assert!(
            e.message.contains("Line 5") && e.message.contains("messages[0].role"),
            "{}",
            e.message
        );
        assert_eq!(e.param.as_deref(), Some("file"));
        let few: Vec<Value> = (0..3).map(chat).collect();
        let e = validate_fine_tune_file(&lines(&few)).unwrap_err();
        assert!(e.message.contains("has 3 example(s)"), "{}", e.message);
        let e = validate_fine_tune_file(b"{\"messages\": [}\n").unwrap_err();
        assert!(e.message.contains("Line 1: not valid JSON"), "{}", e.message);
        let mut mixed: Vec<Value> = (0..12).map(chat).collect();
        mixed[7] = json!({"messages": [{"role": "user", "content": "x"}]});
        let e = validate_fine_tune_file(&lines(&mixed)).unwrap_err();
        assert!(
            e.message.contains("Line 8") && e.message.contains("one format"),
            "{}",
            e.message
        );
        let e = validate_fine_tune_file(b"{\"text\": \"hello\"}\n").unwrap_err();
        assert!(
            e.message.contains("Line 1: expected a supervised"),
            "{}",
            e.message
        );
    }
}
