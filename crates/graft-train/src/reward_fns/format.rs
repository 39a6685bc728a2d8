//! `format`: does the whole completion (leading and trailing whitespace ignored) have the expected
//! structure? 1.0 or 0.0.
//!
//! The default is TRL's reasoning format, `<think>…</think>` then `<answer>…</answer>` with only
//! whitespace around and between them, each tag exactly once. Option `pattern` replaces it with a
//! custom regex that must match the whole (trimmed) completion.

use super::{Options, RewardError, RewardFn, Sample, score_bool};
use regex::Regex;

/// The default structure, `<think>…</think>\s*<answer>…</answer>`.
pub const DEFAULT_PATTERN: &str = r"(?s)<think>.*?</think>\s*<answer>.*?</answer>";

/// The `format` reward function.
#[derive(Clone, Debug)]
pub struct Format {
    re: Regex,
    /// With the default pattern: each tag must occur exactly once.
    tags_once: bool,
}

impl Format {
    /// Reads the option `pattern` (default [`DEFAULT_PATTERN`]); an invalid one is an error
    /// naming it.
    pub(crate) fn from_options(o: &mut Options) -> Result<Format, String> {
        let custom = o.string("pattern")?;
        let tags_once = custom.is_none();
        let pattern = custom.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let re = Regex::new(&format!(r"\A(?:{pattern})\z"))
            .map_err(|e| o.err("pattern", format!("is not a valid regex: {e}")))?;
        Ok(Format { re, tags_once })
    }
}

impl RewardFn for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let text = s.completion.trim();
        let once = !self.tags_once
            || ["<think>", "</think>", "<answer>", "</answer>"]
                .iter()
                .all(|t| text.matches(t).count() == 1);
        Ok(score_bool(once && self.re.is_match(text)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_config;
    use super::super::tests::{cols, score};
    use serde_json::json;

    #[test]
    fn default_is_think_then_answer() {
        let f = from_config("format", &json!(null)).unwrap();
        let c = cols(json!({}));
        assert_eq!(
            score(&*f, "<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>\n", &c),
            1.0
        );
        assert_eq!(
            score(&*f, "<think>multi\nline</think><answer>4</answer>", &c),
            1.0
        );
        assert_eq!(score(&*f, "<answer>4</answer>", &c), 0.0);
        assert_eq!(score(&*f, "<think>x</think>", &c), 0.0);
        assert_eq!(score(&*f, "Sure! <think>x</think><answer>4</answer>", &c), 0.0);
        assert_eq!(
            score(&*f, "<think>x</think><answer>4</answer> hope it helps", &c),
            0.0
        );
        assert_eq!(score(&*f, "<answer>4</answer><think>x</think>", &c), 0.0);
        assert_eq!(score(&*f, "<think>x</think>so<answer>4</answer>", &c), 0.0);
        assert_eq!(
            score(&*f, "<think>x</think><answer>4</answer><answer>5</answer>", &c),
            0.0
        );
    }

    #[test]
    fn custom_pattern_must_match_whole() {
        let f = from_config("format", &json!({"pattern": r"Answer: [A-D]"})).unwrap();
        let c = cols(json!({}));
        assert_eq!(score(&*f, "Answer: B\n", &c), 1.0);
        assert_eq!(score(&*f, "I think Answer: B", &c), 0.0);
        assert_eq!(score(&*f, "Answer: B or C", &c), 0.0);
        let e = from_config("format", &json!({"pattern": "[a-"})).err().unwrap();
        assert!(
            e.starts_with("format: option `pattern` is not a valid regex"),
            "{e}"
        );
    }
}
