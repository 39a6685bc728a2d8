//! Reward functions: the built-in scorers GRPO and RLOO call on each generated completion.
//!
//! A reward function scores one completion given its prompt and the dataset row's other columns
//! (a [`Sample`]) and returns a number, usually in `[0, 1]`. It is a different thing from the
//! reward *model* objective ([`crate::objective::reward`]), which trains a network to score.
//!
//! A config names each function and its options; [`from_config`] builds one:
//!
//! | name | scores | options |
//! |---|---|---|
//! | `math` | final answer equivalent to the reference ([`math`]) | `column` (`answer`) |
//! | `exact_match` | trimmed completion equals a column ([`text`]) | `column` (`answer`), `case_sensitive` (true) |
//! | `contains` | completion contains a text or a column's value ([`text`]) | `text` or `column`, `case_sensitive` (true) |
//! | `regex` | completion matches a pattern anywhere ([`text`]) | `pattern` |
//! | `format` | the whole completion has a structure ([`mod@format`]) | `pattern` (`<think>…</think><answer>…</answer>`) |
//! | `length` | closeness to a target length, or under a maximum ([`length`]) | `target` or `max`, `unit` (`chars`/`words`) |
//! | `json_valid` | the completion (or its ```` ```json ```` block) parses ([`json`]) | — |
//! | `json_schema` | ... and validates against a JSON Schema ([`json`]) | `schema`, or `column` (`schema`) |
//! | `code_tests` | HumanEval-style tests pass in a sandbox ([`code`]) | `timeout_s` (10), `memory_mb` (1024), `prepend_prompt`, `python` |
//! | `command` | a long-lived process answering a JSON line per sample ([`external`]) | `command` (`[program, args...]` or a line for `sh -c`), `cwd`, `timeout_s` (60, per batch) |
//! | `http` | an HTTP endpoint scoring a batch per POST ([`external`]) | `url`, `headers`, `api_key_env`, `timeout_s` (60) |
//! | `openai_grader` | an OpenAI fine-tuning `grader` object: `string_check`, `text_similarity`, `score_model`, `label_model`, `python`, `multi` ([`graders`]) | `grader` (the object, or its JSON text), `base_url` ($GRAFT_GRADER_BASE_URL / $OPENAI_BASE_URL), `api_key_env` ($GRAFT_GRADER_API_KEY / $OPENAI_API_KEY), `allow_python` (false), `timeout_s` (60), `parallel` (4), `python`, `python_timeout_s` (10), `python_memory_mb` (1024), `embeddings_model` |
//! | `judge` | an LLM judge behind an OpenAI-compatible chat API ([`external`]) | `base_url`, `model`, `prompt` (template: `{prompt}`, `{completion}`, `{column}`), `system`, `scale` (10), `max_tokens` (16), `temperature` (0), `parallel` (4), `api_key_env`, `headers`, `timeout_s` (60, per request) |
//!
//! A sample that cannot be scored (a missing column, a sandbox that cannot be set up) gives a
//! [`RewardError`] naming the function and the problem; the trainer decides whether that fails the
//! run or scores 0.

pub mod code;
pub mod external;
pub mod format;
pub mod formula;
pub mod graders;
pub mod json;
pub mod length;
pub mod math;
pub mod similarity;
pub mod text;

use serde_json::{Map, Value};
use std::borrow::Cow;

/// What a reward function sees of one generated completion.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The prompt the completion was generated from.
    pub prompt: &'a str,
    /// The generated text.
    pub completion: &'a str,
    /// Every other column of the dataset row (`answer`, `solution`, `test`, …).
    pub columns: &'a Map<String, Value>,
}

/// Why a sample could not be scored: the function's name and what was wrong, displayed as
/// `math: column `answer` is missing`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{function}: {message}")]
pub struct RewardError {
    /// The reward function's name.
    pub function: String,
    /// What was wrong with the sample (or the environment).
    pub message: String,
}

impl RewardError {
    /// An error of function `function`.
    pub fn new(function: &str, message: impl Into<String>) -> RewardError {
        RewardError {
            function: function.to_string(),
            message: message.into(),
        }
    }
}

/// A function that scores one completion.
pub trait RewardFn: Send + Sync {
    /// The name it is configured by (`math`, `format`, …).
    fn name(&self) -> &str;
    /// The completion's score, or why this sample cannot be scored.
    fn score(&self, s: &Sample) -> Result<f64, RewardError>;

    /// Scores of a batch of samples, in order. External scorers answer a whole batch per round
    /// trip; the default calls [`RewardFn::score`] for each.
    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<f64, RewardError>> {
        samples.iter().map(|s| self.score(s)).collect()
    }
}

/// The names [`from_config`] knows.
pub const KNOWN: &[&str] = &[
    "math",
    "exact_match",
    "contains",
    "regex",
    "format",
    "length",
    "json_valid",
    "json_schema",
    "code_tests",
    "command",
    "http",
    "judge",
    "openai_grader",
];

/// Builds the reward function called `name` with its options `args` (a JSON object, or `null`
/// for none). An unknown name is an error listing the known names; an unknown or ill-typed
/// option is an error naming the key.
pub fn from_config(name: &str, args: &Value) -> Result<Box<dyn RewardFn>, String> {
    let mut opts = Options::new(name, args)?;
    let f: Box<dyn RewardFn> = match name {
        "math" => Box::new(math::Math::from_options(&mut opts)?),
        "exact_match" => Box::new(text::ExactMatch::from_options(&mut opts)?),
        "contains" => Box::new(text::Contains::from_options(&mut opts)?),
        "regex" => Box::new(text::RegexMatch::from_options(&mut opts)?),
        "format" => Box::new(format::Format::from_options(&mut opts)?),
        "length" => Box::new(length::Length::from_options(&mut opts)?),
        "json_valid" => Box::new(json::JsonValid),
        "json_schema" => Box::new(json::JsonSchema::from_options(&mut opts)?),
        "code_tests" => Box::new(code::CodeTests::from_options(&mut opts)?),
        "command" => Box::new(external::CommandReward::from_options(&mut opts)?),
        "http" => Box::new(external::HttpReward::from_options(&mut opts)?),
        "judge" => Box::new(external::JudgeReward::from_options(&mut opts)?),
        "openai_grader" => Box::new(graders::OpenAiGrader::from_options(&mut opts)?),
        _ => {
            return Err(format!(
                "unknown reward function `{name}` (known: {})",
                KNOWN.join(", ")
            ));
        }
    };
    opts.finish()?;
    Ok(f)
}

/// A reward function's options as the config gives them: typed getters whose errors name the
/// key, and a final check that no unknown key was given.
pub(crate) struct Options<'a> {
    function: &'a str,
    map: Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Options<'a> {
    fn new(function: &'a str, args: &Value) -> Result<Options<'a>, String> {
        let map = match args {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            other => {
                return Err(format!(
                    "{function}: options must be a table of key = value, not {other}"
                ));
            }
        };
        Ok(Options {
            function,
            map,
            used: Vec::new(),
        })
    }

    /// The raw value of `key`, if given.
    pub(crate) fn value(&mut self, key: &'static str) -> Option<&Value> {
        self.used.push(key);
        self.map.get(key)
    }

    /// An error about option `key`.
    pub(crate) fn err(&self, key: &str, what: impl std::fmt::Display) -> String {
        format!("{}: option `{key}` {what}", self.function)
    }

    /// A string option.
    pub(crate) fn string(&mut self, key: &'static str) -> Result<Option<String>, String> {
        match self.value(key).cloned() {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("must be a string, not {v}"))),
        }
    }

    /// A boolean option.
    pub(crate) fn bool(&mut self, key: &'static str) -> Result<Option<bool>, String> {
        match self.value(key).cloned() {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.err(key, format!("must be true or false, not {v}"))),
        }
    }

    /// A number option that must be `> 0` (`positive`) or `>= 0`.
    pub(crate) fn number(&mut self, key: &'static str, positive: bool) -> Result<Option<f64>, String> {
        match self.value(key).cloned() {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !x.is_finite() || x < 0.0 || (positive && x == 0.0) {
                    let bound = if positive { "> 0" } else { ">= 0" };
                    Err(self.err(key, format!("must be a number {bound}, not {n}")))
                } else {
                    Ok(Some(x))
                }
            }
            Some(v) => Err(self.err(key, format!("must be a number, not {v}"))),
        }
    }

    /// Fails on a key that no getter asked for.
    fn finish(&self) -> Result<(), String> {
        let mut unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !self.used.contains(k))
            .collect();
        unknown.sort_unstable();
        match unknown.first() {
            None => Ok(()),
            Some(k) => {
                let mut known = self.used.clone();
                known.sort_unstable();
                known.dedup();
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                Err(format!(
                    "{}: unknown option `{k}` (known: {known})",
                    self.function
                ))
            }
        }
    }
}

/// A column of the sample as text: strings as they are, numbers and booleans as JSON writes them.
/// A missing, `null`, array or object column is an error of `function`.
pub(crate) fn column_text<'s>(
    function: &str,
    s: &Sample<'s>,
    column: &str,
) -> Result<Cow<'s, str>, RewardError> {
    match s.columns.get(column) {
        None | Some(Value::Null) => Err(RewardError::new(
            function,
            format!("column `{column}` is missing"),
        )),
        Some(Value::String(t)) => Ok(Cow::Borrowed(t.as_str())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Cow::Owned(v.to_string())),
        Some(v) => Err(RewardError::new(
            function,
            format!(
                "column `{column}` must be text, not {}",
                if v.is_array() { "a list" } else { "an object" }
            ),
        )),
    }
}

/// 1.0 for true, 0.0 for false.
pub(crate) fn score_bool(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A row's columns from a JSON object literal.
    pub(crate) fn cols(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("columns must be an object"),
        }
    }

    /// Scores `completion` with `f` on a row of `columns` and an empty prompt.
    pub(crate) fn score(f: &dyn RewardFn, completion: &str, columns: &Map<String, Value>) -> f64 {
        f.score(&Sample {
            prompt: "",
            completion,
            columns,
        })
        .unwrap()
    }

    #[test]
    fn every_known_name_builds_with_default_options() {
        for name in KNOWN {
            let args = match *name {
                "contains" => json!({"text": "x"}),
                "regex" => json!({"pattern": "x"}),
                "length" => json!({"max": 10}),
                // Nothing starts or connects until the first batch.
                "command" => json!({"command": ["python3", "score.py"]}),
                "http" => json!({"url": "http://127.0.0.1:9/score"}),
                "judge" => {
                    json!({"base_url": "http://127.0.0.1:9/v1", "model": "m", "prompt": "{completion}"})
                }
                "openai_grader" => json!({"grader": {
                    "type": "string_check", "name": "g", "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}", "operation": "eq"}}),
                _ => Value::Null,
            };
            let f = from_config(name, &args).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(f.name(), *name);
        }
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let e = from_config("maths", &Value::Null).err().unwrap();
        assert!(e.contains("unknown reward function `maths`"), "{e}");
        for name in KNOWN {
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn unknown_or_ill_typed_option_names_the_key() {
        let e = from_config("math", &json!({"colum": "x"})).err().unwrap();
        assert_eq!(e, "math: unknown option `colum` (known: column)");
        let e = from_config("math", &json!({"column": 3})).err().unwrap();
        assert!(e.starts_with("math: option `column` must be a string"), "{e}");
        let e = from_config("json_valid", &json!({"x": 1})).err().unwrap();
        assert_eq!(e, "json_valid: unknown option `x` (known: none)");
        let e = from_config("math", &json!([1])).err().unwrap();
        assert!(e.starts_with("math: options must be a table"), "{e}");
    }

    #[test]
    fn missing_column_error_names_function_and_column() {
        let f = from_config("math", &Value::Null).unwrap();
        let c = Map::new();
        let e = f
            .score(&Sample {
                prompt: "",
                completion: "42",
                columns: &c,
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "math: column `answer` is missing");
    }
}
