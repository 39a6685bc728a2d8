//! Dataset files: format detection and typed records, with `file:line` on every error.
//!
//! Reads `.jsonl`, `.json` (an array of rows, or one object), `.txt` (plain text; documents split
//! on `<|endoftext|>` lines), any of them gzip-compressed (`.gz`), and folders of them. Each row
//! becomes a [`Record`]; rows that are not what the format expects become [`RowError`]s naming the
//! line and the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
use crate::template::Message;

/// A dataset layout. Detected per file from the first row's keys; can be forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetFormat {
    /// OpenAI chat fine-tuning: `{"messages": [{role, content, tool_calls?, weight?}], "tools"?}`.
    OpenAiChat,
    /// ShareGPT: `{"conversations": [{"from", "value"}], "system"?, "tools"?}`.
    ShareGpt,
    /// Alpaca: `{"instruction", "input"?, "output", "system"?, "history"?}`.
    Alpaca,
    /// `{"prompt", "completion"}` (also `answer`/`response`, `question`+`answer`,
    /// `problem`+`solution`, `prompt`+`canonical_solution`); strings or message lists.
    PromptCompletion,
    /// Plain text: `{"text"}` rows or `.txt` files.
    Text,
    /// Preference pairs: `prompt`/`chosen`/`rejected` (explicit or implicit prompt, strings or
    /// messages), ShareGPT `conversations` + `chosen`/`rejected`, `chosen_messages`/`rejected_messages`,
    /// `question`/`response_j`/`response_k`.
    Preference,
    /// KTO: `{"prompt", "completion", "label"}` or `{"messages", "label"}`.
    Kto,
}

impl DatasetFormat {
    /// Every format, for help texts.
    pub const ALL: [DatasetFormat; 7] = [
        DatasetFormat::OpenAiChat,
        DatasetFormat::ShareGpt,
        DatasetFormat::Alpaca,
        DatasetFormat::PromptCompletion,
        DatasetFormat::Text,
        DatasetFormat::Preference,
        DatasetFormat::Kto,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DatasetFormat::OpenAiChat => "openai",
            DatasetFormat::ShareGpt => "sharegpt",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::PromptCompletion => "prompt-completion",
            DatasetFormat::Text => "text",
            DatasetFormat::Preference => "preference",
            DatasetFormat::Kto => "kto",
        }
    }
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DatasetFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace(['_', ' '], "-");
        Ok(match norm.as_str() {
            "openai" | "messages" | "chat" | "openai-chat" => DatasetFormat::OpenAiChat,
            "sharegpt" | "conversations" => DatasetFormat::ShareGpt,
            "alpaca" => DatasetFormat::Alpaca,
            "prompt-completion" | "completion" => DatasetFormat::PromptCompletion,
            "text" | "plain" => DatasetFormat::Text,
            "preference" | "dpo" | "pairs" => DatasetFormat::Preference,
            "kto" => DatasetFormat::Kto,
            _ => {
                let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
                return Err(Error::invalid(
                    "--format",
                    format!("unknown format {s:?}; expected one of {}", names.join(", ")),
                ));
            }
        })
    }
}

/// A prompt or response: plain text or chat messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Turns {
    /// Plain text.
    Text(String),
    /// Chat messages.
    Chat(Vec<Message>),
}

impl Turns {
    /// Whether this is conversational.
    pub fn is_chat(&self) -> bool {
        matches!(self, Turns::Chat(_))
    }
}

/// A chat conversation with per-message loss weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// The messages, as the template sees them.
    pub messages: Vec<Message>,
    /// Per message: `Some(0.0)` = do not train this assistant turn (`weight: 0`), `None` = default.
    pub weights: Vec<Option<f32>>,
    /// Tool definitions (OpenAI `{"type": "function", "function": {...}}` objects).
    pub tools: Option<Vec<Json>>,
}

/// A preference pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Preference {
    /// Shared prompt (explicit, or extracted as the common prefix of chosen and rejected).
    pub prompt: Turns,
    /// Preferred response.
    pub chosen: Turns,
    /// Dispreferred response.
    pub rejected: Turns,
    /// Tool definitions, if any.
    pub tools: Option<Vec<Json>>,
    /// How much more the chosen answer is preferred (TRL's optional `margin` column, used by
    /// reward modelling).
    pub margin: Option<f64>,
}

/// A KTO example: a completion labelled desirable or not.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoExample {
    /// The prompt.
    pub prompt: Turns,
    /// The completion.
    pub completion: Turns,
    /// `true` = desirable.
    pub label: bool,
}

/// One dataset row, normalised.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A chat conversation (OpenAI, ShareGPT, Alpaca rows).
    Chat(Conversation),
    /// Plain text for language modelling.
    Text(String),
    /// A prompt and its completion.
    PromptCompletion {
        /// The prompt.
        prompt: Turns,
        /// The completion.
        completion: Turns,
    },
    /// A preference pair.
    Preference(Preference),
    /// A KTO example.
    Kto(KtoExample),
}

/// A record with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Source file.
    pub file: Arc<Path>,
    /// 1-based line where the row starts.
    pub line: usize,
    /// The record.
    pub record: Record,
    /// Things worth a look that do not make the row invalid (missing system message, …).
    pub warnings: Vec<String>,
}

/// A row that could not be read as its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowError {
    /// Source file.
    pub file: Arc<Path>,
    /// 1-based line.
    pub line: usize,
    /// What was wrong and what was expected.
    pub reason: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

/// A loaded dataset: valid rows, invalid rows, and the format of each file.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// Valid rows in file order.
    pub rows: Vec<Row>,
    /// Invalid rows (only kept when loading with `skip_invalid`; otherwise the first is an error).
    pub invalid: Vec<RowError>,
    /// The format used for each file.
    pub formats: Vec<(PathBuf, DatasetFormat)>,
}

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Force a format instead of detecting it.
    pub format: Option<DatasetFormat>,
    /// Skip and count invalid rows instead of failing on the first.
    pub skip_invalid: bool,
}

/// Files a dataset path stands for: the file itself, or the data files of a folder (recursively,
/// sorted; LLaMA-Factory's `dataset_info.json` is metadata and skipped).
pub fn dataset_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::invalid(
            path.display().to_string(),
            "no such file or folder",
        ));
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let p = entry.map_err(|e| Error::io(&dir, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_data_file(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::invalid(
            path.display().to_string(),
            "folder has no .jsonl, .json or .txt files",
        ));
    }
    Ok(out)
}

fn is_data_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == "dataset_info.json" {
        return false;
    }
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".txt")
}

/// The JSON rows of a file or folder (`.jsonl`, `.json`, gzipped or not), each with its place
/// (`file:line`), for datasets read column by column (GRPO / RLOO prompts). A line that is not
/// valid JSON, or a `.txt` file, is an error naming the place.
pub fn json_rows(path: &Path) -> Result<Vec<(String, Json)>> {
    let mut out = Vec::new();
    for file in dataset_files(path)? {
        let place = file.display().to_string();
        match raw_rows(&file)? {
            RawRows::Text(_) => {
                return Err(Error::invalid(
                    place,
                    "is a text file; this method reads rows of JSON (e.g. {\"prompt\": ...})",
                ));
            }
            RawRows::Json(rows) => {
                for (line, row) in rows {
                    let at = format!("{place}:{line}");
                    match row {
                        Ok(v) => out.push((at, v)),
                        Err(why) => return Err(Error::invalid(at, why)),
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Loads a file or folder.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for file in dataset_files(path)? {
        load_file_into(&file, opts, &mut ds)?;
    }
    Ok(ds)
}

/// Reads a file's bytes, gunzipping `.gz`.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::invalid(path.display().to_string(), format!("not a valid gzip file: {e}")))?;
        return Ok(out);
    }
    Ok(raw)
}

/// Raw rows of a file: `(line, parsed JSON or parse error)`, or text documents.
enum RawRows {
    Json(Vec<(usize, std::result::Result<Json, String>)>),
    Text(Vec<(usize, String)>),
}

fn raw_rows(path: &Path) -> Result<RawRows> {
    let bytes = read_maybe_gz(path)?;
    let place = path.display().to_string();
    let text =
        String::from_utf8(bytes).map_err(|e| Error::invalid(&place, format!("not valid UTF-8: {e}")))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".txt") {
        return Ok(RawRows::Text(split_text_documents(&text)));
    }
    if name.ends_with(".jsonl") {
        let rows = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    i + 1,
                    serde_json::from_str::<Json>(l).map_err(|e| format!("invalid JSON: {e}")),
                )
            })
            .collect();
        return Ok(RawRows::Json(rows));
    }
    // .json: an array of rows (each located by its starting line) or one object.
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let offset = text.len() - trimmed.len();
        let elements = split_json_array(trimmed)
            .map_err(|(pos, why)| Error::invalid(format!("{place}:{}", line_of(&text, offset + pos)), why))?;
        let rows = elements
            .into_iter()
            .map(|(s, e)| {
                let line = line_of(&text, offset + s);
                (
                    line,
                    serde_json::from_str::<Json>(&trimmed[s..e]).map_err(|e| format!("invalid JSON: {e}")),
                )
            })
            .collect();
        return Ok(RawRows::Json(rows));
    }
    match serde_json::from_str::<Json>(&text) {
        Ok(v) => Ok(RawRows::Json(vec![(
            line_of(&text, text.len() - trimmed.len()),
            Ok(v),
        )])),
        Err(e) => {
            // Maybe JSON Lines with a .json name.
            let lines: Vec<_> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .collect();
            if lines.len() > 1 && lines.iter().all(|(_, l)| serde_json::from_str::<Json>(l).is_ok()) {
                return Ok(RawRows::Json(
                    lines
                        .into_iter()
                        .map(|(i, l)| (i + 1, Ok(serde_json::from_str(l).unwrap_or(Json::Null))))
                        .collect(),
                ));
            }
            Err(Error::invalid(
                format!("{place}:{}", e.line()),
                format!("invalid JSON: {e}"),
            ))
        }
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Splits plain text into documents at lines that are exactly `<|endoftext|>`; one document when
/// there are none. Returns `(start line, text)`.
fn split_text_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    let has_separator = text.lines().any(|l| l.trim() == "<|endoftext|>");
    if !has_separator {
        if !text.trim().is_empty() {
            docs.push((1, text.to_string()));
        }
        return docs;
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim() == "<|endoftext|>" {
            if !cur.trim().is_empty() {
                docs.push((start, cur.trim_end_matches('\n').to_string()));
            }
            cur.clear();
            start = i + 2;
        } else {
            if cur.is_empty() && line.trim().is_empty() {
                start = i + 2;
                continue;
            }
            cur.push_str(line);
            cur.push('\n');
        }
    }
    if !cur.trim().is_empty() {
        docs.push((start, cur.trim_end_matches('\n').to_string()));
    }
    docs
}

/// Byte ranges of the elements of a top-level JSON array (structure only; elements are parsed
/// afterwards so that each error can name its own line).
fn split_json_array(s: &str) -> std::result::Result<Vec<(usize, usize)>, (usize, String)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut esc = false;
    let mut start: Option<usize> = None;
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
            }
            b'[' | b'{' => {
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
                depth += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    if let Some(st) = start.take() {
                        out.push((st, i));
                    }
                    return Ok(trim_ranges(s, out));
                }
            }
            b',' if depth == 1 => match start.take() {
                Some(st) => out.push((st, i)),
                None => return Err((i, "expected a value before ','".into())),
            },
            c if depth == 1 && start.is_none() && !c.is_ascii_whitespace() => start = Some(i),
            _ => {}
        }
    }
    Err((b.len(), "unterminated JSON array: expected ']'".into()))
}

fn trim_ranges(s: &str, ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges
        .into_iter()
        .map(|(a, e)| {
            let t = s[a..e].trim_end();
            (a, a + t.len())
        })
        .collect()
}

/// Detects the format of one JSON row from its keys.
pub fn detect_row_format(row: &Json) -> Option<DatasetFormat> {
    let obj = row.as_object()?;
    let has = |k: &str| obj.contains_key(k);
    Some(
        if has("label") && (has("messages") || (has("prompt") && has("completion"))) {
            DatasetFormat::Kto
        } else if has("chosen_messages") && has("rejected_messages")
            || has("chosen") && has("rejected")
            || has("preferred_output") && has("non_preferred_output")
            || has("question") && has("response_j") && has("response_k")
        {
            DatasetFormat::Preference
        } else if has("messages") {
            DatasetFormat::OpenAiChat
        } else if has("conversations") {
            DatasetFormat::ShareGpt
        } else if has("instruction") && has("output") {
            DatasetFormat::Alpaca
        } else if (has("prompt")
            && ["completion", "response", "answer", "canonical_solution", "output"]
                .iter()
                .any(|k| has(k)))
            || (has("question") && has("answer"))
            || (has("problem") && has("solution"))
        {
            DatasetFormat::PromptCompletion
        } else if has("text") {
            DatasetFormat::Text
        } else {
            return None;
        },
    )
}

fn load_file_into(file: &Path, opts: &LoadOptions, ds: &mut Dataset) -> Result<()> {
    let arc: Arc<Path> = Arc::from(file);
    let raw = raw_rows(file)?;
    let fail = |ds: &mut Dataset, line: usize, reason: String| -> Result<()> {
        let err = RowError {
            file: arc.clone(),
            line,
            reason,
        };
        if opts.skip_invalid {
            ds.invalid.push(err);
            Ok(())
        } else {
            Err(Error::invalid(
                format!("{}:{}", err.file.display(), err.line),
                err.reason,
            ))
        }
    };
    match raw {
        RawRows::Text(docs) => {
            if let Some(f) = opts.format
                && f != DatasetFormat::Text
            {
                return Err(Error::invalid(
                    file.display().to_string(),
                    format!("a .txt file can only be read as text, not {f}"),
                ));
            }
            ds.formats.push((file.to_path_buf(), DatasetFormat::Text));
            for (line, text) in docs {
                ds.rows.push(Row {
                    file: arc.clone(),
                    line,
                    record: Record::Text(text),
                    warnings: vec![],
                });
            }
        }
        RawRows::Json(rows) => {
            let format = match opts.format {
                Some(f) => f,
                None => {
                    let first = rows
                        .iter()
                        .find_map(|(_, r)| r.as_ref().ok().and_then(detect_row_format));
                    match first {
                        Some(f) => f,
                        None if rows.is_empty() => {
                            return Err(Error::invalid(
                                file.display().to_string(),
                                "the file is empty: expected one JSON object per line (or a JSON array of objects)",
                            ));
                        }
                        None if file.file_name().is_some_and(|n| n == "dataset_info.json") => {
                            return Err(Error::invalid(
                                file.display().to_string(),
                                "this is LLaMA-Factory's dataset_info.json (metadata), not a dataset",
                            ));
                        }
                        None => {
                            let keys = rows
                                .iter()
                                .find_map(|(_, r)| r.as_ref().ok().and_then(|v| v.as_object()))
                                .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                                .unwrap_or_default();
                            return Err(Error::invalid(
                                file.display().to_string(),
                                format!(
                                    "cannot detect the dataset format from the keys [{keys}]; expected messages, conversations, instruction/output, prompt/completion, text, chosen/rejected or label; or name the format (data.format in a train config, --format for graft data inspect)"
                                ),
                            ));
                        }
                    }
                }
            };
            ds.formats.push((file.to_path_buf(), format));
            let start = ds.rows.len();
            for (line, parsed) in rows {
                let value = match parsed {
                    Ok(v) => v,
                    Err(reason) => {
                        fail(ds, line, reason)?;
                        continue;
                    }
                };
                match parse_row(&value, format) {
                    Ok(record) => ds.rows.push(Row {
                        file: arc.clone(),
                        line,
                        record,
                        warnings: vec![],
                    }),
                    Err(reason) => fail(ds, line, reason)?,
                }
            }
            add_chat_warnings(&mut ds.rows[start..]);
        }
    }
    Ok(())
}

/// Flags conversations that differ from the rest of their file in ways training will notice:
/// no user message before an assistant turn, or no system message while other rows have one.
fn add_chat_warnings(rows: &mut [Row]) {
    let has_system = |r: &Row| match &r.record {
        Record::Chat(c) => c.messages.iter().any(|m| m.role == "system"),
        _ => false,
    };
    let with_system = rows.iter().filter(|r| has_system(r)).count();
    for row in rows.iter_mut() {
        let Record::Chat(c) = &row.record else { continue };
        let mut warnings = Vec::new();
        if with_system > 0 && !has_system(row) {
            warnings.push(format!(
                "no system message ({with_system} other rows of this file have one)"
            ));
        }
        if let Some(first_assistant) = c.messages.iter().position(|m| m.role == "assistant")
            && !c.messages[..first_assistant].iter().any(|m| m.role == "user")
        {
            warnings.push("no user message before the first assistant message".to_string());
        }
        row.warnings.extend(warnings);
    }
}

const ROLES: [&str; 7] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
    "ipython",
];

/// Turns typed content parts into a string when they are all text.
fn content_of(v: Option<&Json>, field: &str) -> std::result::Result<Json, String> {
    match v {
        None | Some(Json::Null) => Ok(Json::Null),
        Some(Json::String(s)) => Ok(Json::String(s.clone())),
        Some(Json::Array(parts)) => {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p {
                    Json::String(s) => text.push_str(s),
                    Json::Object(o) => {
                        let ty = o.get("type").and_then(|t| t.as_str()).unwrap_or("text");
                        if ty != "text" {
                            return Err(format!(
                                "{field}[{i}]: only text content parts are supported, found type {ty:?}"
                            ));
                        }
                        match o.get("text").or_else(|| o.get("value")) {
                            Some(Json::String(s)) => text.push_str(s),
                            _ => {
                                return Err(format!(
                                    "{field}[{i}]: expected a text part with a string \"text\""
                                ));
                            }
                        }
                    }
                    _ => return Err(format!("{field}[{i}]: expected a content part object")),
                }
            }
            Ok(Json::String(text))
        }
        Some(other) => Err(format!(
            "{field}: expected a string, null or a list of text parts, got {}",
            kind(other)
        )),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Normalises `tool_calls`: `arguments` given as a JSON string become an object, as templates expect.
fn normalise_tool_calls(v: &Json, field: &str) -> std::result::Result<Json, String> {
    let Json::Array(calls) = v else {
        return Err(format!("{field}: expected a list of tool calls"));
    };
    let mut out = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let Json::Object(obj) = call else {
            return Err(format!("{field}[{i}]: expected an object"));
        };
        let mut obj = obj.clone();
        if let Some(Json::Object(f)) = obj.get_mut("function") {
            if !f.get("name").is_some_and(|n| n.is_string()) {
                return Err(format!("{field}[{i}].function.name: expected a string"));
            }
            if let Some(Json::String(args)) = f.get("arguments")
                && let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(args)
            {
                f.insert("arguments".into(), parsed);
            }
        } else if !obj.contains_key("name") {
            return Err(format!(
                "{field}[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"
            ));
        }
        out.push(Json::Object(obj));
    }
    Ok(Json::Array(out))
}

/// Parses OpenAI-style messages (validating roles and content, turning text-part lists into
/// strings and JSON-string tool-call `arguments` into objects) with their per-message weights.
/// `field` names the list in error messages.
pub fn parse_messages(
    v: &Json,
    field: &str,
) -> std::result::Result<(Vec<Message>, Vec<Option<f32>>), String> {
    let Json::Array(list) = v else {
        return Err(format!("{field}: expected a list of messages, got {}", kind(v)));
    };
    if list.is_empty() {
        return Err(format!("{field}: expected at least one message"));
    }
    let mut messages = Vec::with_capacity(list.len());
    let mut weights = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Json::Object(obj) = m else {
            return Err(format!(
                "{f}: expected an object with \"role\" and \"content\", got {}",
                kind(m)
            ));
        };
        let role = match obj.get("role") {
            Some(Json::String(r)) => r.clone(),
            Some(other) => return Err(format!("{f}.role: expected a string, got {}", kind(other))),
            None => return Err(format!("{f}: missing \"role\"")),
        };
        if !ROLES.contains(&role.as_str()) {
            return Err(format!(
                "{f}.role: expected one of {}, got {role:?}",
                ROLES.join("/")
            ));
        }
        let has_tool_calls = obj.get("tool_calls").is_some_and(|t| !t.is_null());
        if !obj.contains_key("content") && !has_tool_calls {
            return Err(format!("{f}: missing \"content\""));
        }
        let content = content_of(obj.get("content"), &format!("{f}.content"))?;
        if content.is_null() && !has_tool_calls && role != "assistant" {
            return Err(format!("{f}.content: expected a string, got null"));
        }
        let mut extra = Map::new();
        let mut weight = None;
        for (k, v) in obj {
            match k.as_str() {
                "role" | "content" => {}
                "weight" => match v.as_f64() {
                    Some(w) if w == 0.0 || w == 1.0 => {
                        if role != "assistant" {
                            return Err(format!("{f}.weight: only assistant messages take a weight"));
                        }
                        weight = Some(w as f32);
                    }
                    _ => return Err(format!("{f}.weight: expected 0 or 1, got {v}")),
                },
                "loss_weight" => match v.as_f64() {
                    Some(w) if w >= 0.0 => weight = Some(w as f32),
                    _ => {
                        return Err(format!(
                            "{f}.loss_weight: expected a non-negative number, got {v}"
                        ));
                    }
                },
                "tool_calls" if !v.is_null() => {
                    extra.insert(k.clone(), normalise_tool_calls(v, &format!("{f}.tool_calls"))?);
                }
                _ => {
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        // OpenAI's `developer` role is the system prompt of newer models, and legacy `function`
        // messages are tool results; chat templates know `system` and `tool`.
        let role = match role.as_str() {
            "developer" => "system".to_string(),
            "function" => "tool".to_string(),
            _ => role,
        };
        messages.push(Message { role, content, extra });
        weights.push(weight);
    }
    Ok((messages, weights))
}

fn parse_tools(v: Option<&Json>, field: &str) -> std::result::Result<Option<Vec<Json>>, String> {
    let v = match v {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Json::String(s)) => serde_json::from_str::<Json>(s)
            .map_err(|e| format!("{field}: expected a JSON list of tools: {e}"))?,
        Some(v) => v.clone(),
    };
    let Json::Array(list) = v else {
        return Err(format!("{field}: expected a list of tool definitions"));
    };
    let tools = list
        .into_iter()
        .map(|t| match &t {
            Json::Object(o) if !o.contains_key("type") && o.contains_key("name") => {
                serde_json::json!({"type": "function", "function": t})
            }
            _ => t,
        })
        .collect();
    Ok(Some(tools))
}

fn string_field(obj: &Map<String, Json>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{key}: expected a string, got {}", kind(other))),
        None => Err(format!("missing \"{key}\"")),
    }
}

/// Parses ShareGPT turns into messages.
fn parse_sharegpt(v: &Json, field: &str) -> std::result::Result<Vec<Message>, String> {
    let Json::Array(list) = v else {
        return Err(format!(
            "{field}: expected a list of {{\"from\", \"value\"}} turns, got {}",
            kind(v)
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        out.push(parse_sharegpt_turn(t, &f)?);
    }
    Ok(out)
}

fn parse_sharegpt_turn(t: &Json, f: &str) -> std::result::Result<Message, String> {
    let Json::Object(obj) = t else {
        return Err(format!("{f}: expected an object with \"from\" and \"value\""));
    };
    // Some exports use role/content inside `conversations`.
    if obj.contains_key("role") {
        let (mut m, _) = parse_messages(&Json::Array(vec![t.clone()]), f)?;
        return Ok(m.remove(0));
    }
    let from = obj
        .get("from")
        .and_then(|v| v.as_str())
        .ok_or(format!("{f}: missing string \"from\""))?;
    let value = match obj.get("value") {
        Some(Json::String(s)) => s.clone(),
        Some(other) => return Err(format!("{f}.value: expected a string, got {}", kind(other))),
        None => return Err(format!("{f}: missing \"value\"")),
    };
    Ok(match from {
        "human" | "user" => Message::new("user", value),
        "gpt" | "assistant" | "model" | "chatgpt" | "bard" | "bing" => Message::new("assistant", value),
        "system" => Message::new("system", value),
        "function_call" => {
            let call: Json = serde_json::from_str(&value).map_err(|e| {
                format!("{f}.value: function_call must be JSON {{\"name\", \"arguments\"}}: {e}")
            })?;
            let calls = match call {
                Json::Array(list) => list,
                one => vec![one],
            };
            let mut tool_calls = Vec::new();
            for c in calls {
                let name = c
                    .get("name")
                    .and_then(|n| n.as_str())
                    .ok_or(format!("{f}.value: function call has no \"name\""))?;
                let mut args = c.get("arguments").cloned().unwrap_or(Json::Object(Map::new()));
                if let Json::String(s) = &args
                    && let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(s)
                {
                    args = parsed;
                }
                tool_calls.push(
                    serde_json::json!({"type": "function", "function": {"name": name, "arguments": args}}),
                );
            }
            let mut m = Message {
                role: "assistant".into(),
                content: Json::String(String::new()),
                extra: Map::new(),
            };
            m.extra.insert("tool_calls".into(), Json::Array(tool_calls));
            m
        }
        "observation" | "tool" | "function" => Message::new("tool", value),
        other => {
            return Err(format!(
                "{f}.from: expected human/user, gpt/assistant, system, function_call or observation, got {other:?}"
            ));
        }
    })
}

fn require_assistant(messages: &[Message], field: &str) -> std::result::Result<(), String> {
    if messages.iter().any(|m| m.role == "assistant") {
        Ok(())
    } else {
        Err(format!(
            "{field}: expected at least one assistant message (nothing to train on)"
        ))
    }
}

/// Reads a prompt/response value that may be a string or a message list.
fn turns_of(v: &Json, field: &str) -> std::result::Result<Turns, String> {
    match v {
        Json::String(s) => Ok(Turns::Text(s.clone())),
        Json::Array(_) => Ok(Turns::Chat(parse_messages(v, field)?.0)),
        Json::Object(o) if o.contains_key("from") => Ok(Turns::Chat(vec![parse_sharegpt_turn(v, field)?])),
        Json::Object(o) if o.contains_key("role") => Ok(Turns::Chat(
            parse_messages(&Json::Array(vec![v.clone()]), field)?.0,
        )),
        other => Err(format!(
            "{field}: expected a string or a list of messages, got {}",
            kind(other)
        )),
    }
}

/// Splits chosen/rejected without an explicit prompt at their common prefix.
fn implicit_prompt(chosen: Turns, rejected: Turns) -> std::result::Result<(Turns, Turns, Turns), String> {
    match (chosen, rejected) {
        (Turns::Chat(c), Turns::Chat(r)) => {
            let common = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if common == c.len() || common == r.len() {
                return Err("chosen and rejected do not differ after their shared prompt".into());
            }
            Ok((
                Turns::Chat(c[..common].to_vec()),
                Turns::Chat(c[common..].to_vec()),
                Turns::Chat(r[common..].to_vec()),
            ))
        }
        (Turns::Text(c), Turns::Text(r)) => {
            let mut common = c.bytes().zip(r.bytes()).take_while(|(a, b)| a == b).count();
            while !c.is_char_boundary(common) {
                common -= 1;
            }
            if common == c.len() && common == r.len() {
                return Err("chosen and rejected are identical".into());
            }
            // Cut after the last assistant marker in the shared part (HH-RLHF transcripts), else at a
            // word boundary so no token straddles prompt and response.
            let shared = &c[..common];
            let cut = if let Some(p) = shared.rfind("\n\nAssistant:") {
                p + "\n\nAssistant:".len()
            } else {
                shared
                    .char_indices()
                    .rfind(|(_, ch)| ch.is_whitespace())
                    .map(|(p, ch)| p + ch.len_utf8())
                    .filter(|_| common < c.len().min(r.len()))
                    .unwrap_or(common)
            };
            Ok((
                Turns::Text(c[..cut].to_string()),
                Turns::Text(c[cut..].to_string()),
                Turns::Text(r[cut..].to_string()),
            ))
        }
        _ => Err("chosen and rejected must both be strings or both be message lists".into()),
    }
}

/// Parses one JSON row as `format`. The error names the field and what was expected.
pub fn parse_row(v: &Json, format: DatasetFormat) -> std::result::Result<Record, String> {
    let Json::Object(obj) = v else {
        return Err(format!("expected a JSON object, got {}", kind(v)));
    };
    let get = |k: &str| obj.get(k).ok_or(format!("missing \"{k}\" (format {format})"));
    match format {
        DatasetFormat::OpenAiChat => {
            let (messages, weights) = parse_messages(get("messages")?, "messages")?;
            require_assistant(&messages, "messages")?;
            let tools = parse_tools(obj.get("tools").or(obj.get("functions")), "tools")?;
            Ok(Record::Chat(Conversation {
                messages,
                weights,
                tools,
            }))
        }
        DatasetFormat::ShareGpt => {
            let mut messages = parse_sharegpt(get("conversations")?, "conversations")?;
            if let Some(Json::String(system)) = obj.get("system")
                && !system.is_empty()
                && messages.first().is_none_or(|m| m.role != "system")
            {
                messages.insert(0, Message::new("system", system.clone()));
            }
            require_assistant(&messages, "conversations")?;
            let tools = parse_tools(obj.get("tools"), "tools")?;
            let weights = vec![None; messages.len()];
            Ok(Record::Chat(Conversation {
                messages,
                weights,
                tools,
            }))
        }
        DatasetFormat::Alpaca => {
            let instruction = string_field(obj, "instruction")?;
            let input = match obj.get("input") {
                None | Some(Json::Null) => String::new(),
                Some(Json::String(s)) => s.clone(),
                Some(other) => return Err(format!("input: expected a string, got {}", kind(other))),
            };
            let output = string_field(obj, "output")?;
            let mut messages = Vec::new();
            if let Some(Json::String(system)) = obj.get("system")
                && !system.is_empty()
            {
                messages.push(Message::new("system", system.clone()));
            }
            if let Some(Json::Array(history)) = obj.get("history") {
                for (i, pair) in history.iter().enumerate() {
                    match pair.as_array().map(|p| p.as_slice()) {
                        Some([Json::String(q), Json::String(a)]) => {
                            messages.push(Message::new("user", q.clone()));
                            messages.push(Message::new("assistant", a.clone()));
                        }
                        _ => return Err(format!("history[{i}]: expected [instruction, response] strings")),
                    }
                }
            }
            let user = if input.is_empty() {
                instruction
            } else {
                format!("{instruction}\n{input}")
            };
            messages.push(Message::new("user", user));
            messages.push(Message::new("assistant", output));
            let weights = vec![None; messages.len()];
            Ok(Record::Chat(Conversation {
                messages,
                weights,
                tools: None,
            }))
        }
        DatasetFormat::PromptCompletion => {
            let (pk, ck) = if obj.contains_key("prompt") {
                let ck = ["completion", "response", "answer", "canonical_solution", "output"]
                    .into_iter()
                    .find(|k| obj.contains_key(*k))
                    .ok_or("missing \"completion\" (format prompt-completion)")?;
                ("prompt", ck)
            } else if obj.contains_key("question") {
                ("question", "answer")
            } else if obj.contains_key("problem") {
                ("problem", "solution")
            } else {
                return Err("missing \"prompt\" (format prompt-completion)".into());
            };
            let prompt = turns_of(get(pk)?, pk)?;
            let completion = turns_of(get(ck)?, ck)?;
            if prompt.is_chat() != completion.is_chat() {
                return Err(format!(
                    "{pk} and {ck} must both be strings or both be message lists"
                ));
            }
            if let Turns::Chat(c) = &completion {
                require_assistant(c, ck)?;
            }
            Ok(Record::PromptCompletion { prompt, completion })
        }
        DatasetFormat::Text => match get("text")? {
            Json::String(s) => Ok(Record::Text(s.clone())),
            other => Err(format!("text: expected a string, got {}", kind(other))),
        },
        DatasetFormat::Preference => parse_preference(obj),
        DatasetFormat::Kto => {
            let label = match get("label")? {
                Json::Bool(b) => *b,
                Json::Number(n) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => {
                    n.as_f64() == Some(1.0)
                }
                Json::String(s) if s == "true" || s == "false" => s == "true",
                other => return Err(format!("label: expected true or false, got {other}")),
            };
            if let Some(messages) = obj.get("messages") {
                let (messages, _) = parse_messages(messages, "messages")?;
                let last = messages.len() - 1;
                if messages[last].role != "assistant" {
                    return Err(format!(
                        "messages[{last}]: expected the completion as a final assistant message"
                    ));
                }
                return Ok(Record::Kto(KtoExample {
                    prompt: Turns::Chat(messages[..last].to_vec()),
                    completion: Turns::Chat(vec![messages[last].clone()]),
                    label,
                }));
            }
            let prompt = turns_of(get("prompt")?, "prompt")?;
            let completion = turns_of(get("completion")?, "completion")?;
            if prompt.is_chat() != completion.is_chat() {
                return Err("prompt and completion must both be strings or both be message lists".into());
            }
            Ok(Record::Kto(KtoExample {
                prompt,
                completion,
                label,
            }))
        }
    }
}

/// OpenAI's DPO fine-tuning rows: `{"input": {"messages", "tools"?}, "preferred_output":
/// [assistant message], "non_preferred_output": [assistant message]}`.
fn parse_openai_preference(obj: &Map<String, Json>) -> std::result::Result<Record, String> {
    let input = match obj.get("input") {
        Some(Json::Object(i)) => i,
        Some(other) => {
            return Err(format!(
                "input: expected an object with \"messages\", got {}",
                kind(other)
            ));
        }
        None => {
            return Err(
                "missing \"input\" (OpenAI DPO rows: input, preferred_output, non_preferred_output)".into(),
            );
        }
    };
    let (prompt, _) = parse_messages(
        input.get("messages").ok_or("input: missing \"messages\"")?,
        "input.messages",
    )?;
    let tools = parse_tools(input.get("tools"), "input.tools")?;
    let output = |field: &str| -> std::result::Result<Turns, String> {
        let v = obj.get(field).ok_or(format!("missing \"{field}\""))?;
        let (m, _) = parse_messages(v, field)?;
        if m.iter().any(|m| m.role != "assistant") {
            return Err(format!("{field}: expected assistant messages only"));
        }
        Ok(Turns::Chat(m))
    };
    Ok(Record::Preference(Preference {
        prompt: Turns::Chat(prompt),
        chosen: output("preferred_output")?,
        rejected: output("non_preferred_output")?,
        tools,
        margin: None,
    }))
}

fn parse_preference(obj: &Map<String, Json>) -> std::result::Result<Record, String> {
    if obj.contains_key("preferred_output") {
        return parse_openai_preference(obj);
    }
    let tools = parse_tools(obj.get("tools"), "tools")?;
    let margin = match obj.get("margin") {
        None | Some(Json::Null) => None,
        Some(Json::Number(n)) => n.as_f64(),
        Some(other) => return Err(format!("margin: expected a number, got {other}")),
    };
    if obj.contains_key("question") && obj.contains_key("response_j") {
        return Ok(Record::Preference(Preference {
            prompt: Turns::Text(string_field(obj, "question")?),
            chosen: Turns::Text(string_field(obj, "response_j")?),
            rejected: Turns::Text(string_field(obj, "response_k")?),
            tools,
            margin,
        }));
    }
    if let (Some(c), Some(r)) = (obj.get("chosen_messages"), obj.get("rejected_messages")) {
        let c = Turns::Chat(parse_messages(c, "chosen_messages")?.0);
        let r = Turns::Chat(parse_messages(r, "rejected_messages")?.0);
        let (prompt, chosen, rejected) = implicit_prompt(c, r)?;
        return Ok(Record::Preference(Preference {
            prompt,
            chosen,
            rejected,
            tools,
            margin,
        }));
    }
    let chosen = turns_of(obj.get("chosen").ok_or("missing \"chosen\"")?, "chosen")?;
    let rejected = turns_of(obj.get("rejected").ok_or("missing \"rejected\"")?, "rejected")?;
    let prompt = if let Some(conv) = obj.get("conversations") {
        Some(Turns::Chat(parse_sharegpt(conv, "conversations")?))
    } else {
        obj.get("prompt").map(|p| turns_of(p, "prompt")).transpose()?
    };
    let (prompt, chosen, rejected) = match prompt {
        Some(p) => {
            if p.is_chat() != chosen.is_chat() || chosen.is_chat() != rejected.is_chat() {
                return Err("prompt, chosen and rejected must all be strings or all be message lists".into());
            }
            (p, chosen, rejected)
        }
        None => implicit_prompt(chosen, rejected)?,
    };
    for (name, t) in [("chosen", &chosen), ("rejected", &rejected)] {
        if let Turns::Chat(m) = t {
            require_assistant(m, name)?;
        }
    }
    Ok(Record::Preference(Preference {
        prompt,
        chosen,
        rejected,
        tools,
        margin,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_array_elements_carry_their_lines() {
        let text = "[\n  {\"a\": \"x,]\"},\n  {\"b\": [1,\n 2]}\n]";
        let ranges = split_json_array(text).unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(&text[ranges[0].0..ranges[0].1], "{\"a\": \"x,]\"}");
        assert_eq!(line_of(text, ranges[1].0), 3);
        assert!(split_json_array("[1, 2").is_err());
        assert_eq!(split_json_array("[]").unwrap(), vec![]);
    }

    #[test]
    fn openai_dpo_rows() {
        let row = json!({
            "input": {"messages": [{"role": "user", "content": "Hi"}], "tools": []},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}]
        });
        let Record::Preference(p) = parse_row(&row, DatasetFormat::Preference).unwrap() else {
            panic!("not a preference")
        };
        assert_eq!(p.prompt, Turns::Chat(vec![Message::new("user", "Hi")]));
        assert_eq!(p.chosen, Turns::Chat(vec![Message::new("assistant", "Hello!")]));
        assert_eq!(
            p.rejected,
            Turns::Chat(vec![Message::new("assistant", "Go away.")])
        );
        let bad = json!({
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "user", "content": "x"}],
            "non_preferred_output": [{"role": "assistant", "content": "y"}]
        });
        let e = parse_row(&bad, DatasetFormat::Preference).unwrap_err();
        assert!(
            e.contains("preferred_output: expected assistant messages only"),
            "{e}"
        );
        let e = parse_row(
            &json!({"preferred_output": [], "non_preferred_output": []}),
            DatasetFormat::Preference,
        )
        .unwrap_err();
        assert!(e.contains("missing \"input\""), "{e}");
    }

    #[test]
    fn detects_formats() {
        let cases = [
            (json!({"messages": []}), DatasetFormat::OpenAiChat),
            (json!({"messages": [], "label": true}), DatasetFormat::Kto),
            (json!({"conversations": []}), DatasetFormat::ShareGpt),
            (
                json!({"conversations": [], "chosen": {}, "rejected": {}}),
                DatasetFormat::Preference,
            ),
            (
                json!({"instruction": "", "input": "", "output": ""}),
                DatasetFormat::Alpaca,
            ),
            (
                json!({"prompt": "", "completion": ""}),
                DatasetFormat::PromptCompletion,
            ),
            (
                json!({"question": "", "answer": ""}),
                DatasetFormat::PromptCompletion,
            ),
            (json!({"text": ""}), DatasetFormat::Text),
            (json!({"chosen": "", "rejected": ""}), DatasetFormat::Preference),
            (
                json!({"input": {}, "preferred_output": [], "non_preferred_output": []}),
                DatasetFormat::Preference,
            ),
        ];
        for (row, f) in cases {
            assert_eq!(detect_row_format(&row), Some(f), "{row}");
        }
        assert_eq!(detect_row_format(&json!({"foo": 1})), None);
    }

    #[test]
    fn openai_rows_validate_roles_weights_and_tool_calls() {
        let ok = json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": "1", "tool_call_id": "c1"},
            {"role": "assistant", "content": "done", "weight": 0}]});
        let Record::Chat(c) = parse_row(&ok, DatasetFormat::OpenAiChat).unwrap() else {
            panic!()
        };
        assert_eq!(c.weights[3], Some(0.0));
        assert_eq!(
            c.messages[1].extra["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        let bad_role = json!({"messages": [{"role": "bot", "content": "x"}]});
        assert!(
            parse_row(&bad_role, DatasetFormat::OpenAiChat)
                .unwrap_err()
                .contains("messages[0].role")
        );
        let bad_weight = json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]});
        assert!(
            parse_row(&bad_weight, DatasetFormat::OpenAiChat)
                .unwrap_err()
                .contains("expected 0 or 1")
        );
        let no_assistant = json!({"messages": [{"role": "user", "content": "x"}]});
        assert!(
            parse_row(&no_assistant, DatasetFormat::OpenAiChat)
                .unwrap_err()
                .contains("assistant")
        );
    }

    #[test]
    fn implicit_prompts() {
        let (p, c, r) = implicit_prompt(
            Turns::Text("\n\nHuman: hi\n\nAssistant: Sure thing".into()),
            Turns::Text("\n\nHuman: hi\n\nAssistant: Sure not".into()),
        )
        .unwrap();
        assert_eq!(p, Turns::Text("\n\nHuman: hi\n\nAssistant:".into()));
        assert_eq!(c, Turns::Text(" Sure thing".into()));
        assert_eq!(r, Turns::Text(" Sure not".into()));
        let (p, _, _) = implicit_prompt(Turns::Text("Q: a b".into()), Turns::Text("Q: a c".into())).unwrap();
        assert_eq!(p, Turns::Text("Q: a ".into()));
        // A multi-byte space (U+3000) before the divergence must not split a character.
        let (p, c, _) = implicit_prompt(
            Turns::Text("問\u{3000}はい".into()),
            Turns::Text("問\u{3000}いいえ".into()),
        )
        .unwrap();
        assert_eq!(p, Turns::Text("問\u{3000}".into()));
        assert_eq!(c, Turns::Text("はい".into()));
    }

    #[test]
    fn text_documents_split_on_endoftext() {
        let docs = split_text_documents("one\ntwo\n<|endoftext|>\nthree\n<|endoftext|>\n");
        assert_eq!(docs, vec![(1, "one\ntwo".to_string()), (4, "three".to_string())]);
        assert_eq!(split_text_documents("plain").len(), 1);
    }
}
