//! Text matching: `exact_match`, `contains` and `regex`, each 1.0 or 0.0.

use super::{Options, RewardError, RewardFn, Sample, column_text, score_bool};
use regex::Regex;

/// `exact_match`: the trimmed completion equals the (trimmed) column `column` (default `answer`),
/// case-sensitively unless `case_sensitive = false`.
#[derive(Clone, Debug)]
pub struct ExactMatch {
    column: String,
    case_sensitive: bool,
}

impl ExactMatch {
    /// Reads the options `column` and `case_sensitive`.
    pub(crate) fn from_options(o: &mut Options) -> Result<ExactMatch, String> {
        Ok(ExactMatch {
            column: o.string("column")?.unwrap_or_else(|| "answer".into()),
            case_sensitive: o.bool("case_sensitive")?.unwrap_or(true),
        })
    }
}

impl RewardFn for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let want = column_text("exact_match", s, &self.column)?;
        let (got, want) = (s.completion.trim(), want.trim());
        Ok(score_bool(if self.case_sensitive {
            got == want
        } else {
            got.to_lowercase() == want.to_lowercase()
        }))
    }
}

/// Where `contains` finds the text to look for.
#[derive(Clone, Debug)]
enum Needle {
    Text(String),
    Column(String),
}

/// `contains`: the completion contains a fixed `text` or the value of column `column` (exactly
/// one of the two), case-sensitively unless `case_sensitive = false`.
#[derive(Clone, Debug)]
pub struct Contains {
    needle: Needle,
    case_sensitive: bool,
}

impl Contains {
    /// Reads the options `text` / `column` and `case_sensitive`.
    pub(crate) fn from_options(o: &mut Options) -> Result<Contains, String> {
        let needle = match (o.string("text")?, o.string("column")?) {
            (Some(t), None) => {
                if t.is_empty() {
                    return Err(o.err("text", "must not be empty"));
                }
                Needle::Text(t)
            }
            (None, Some(c)) => Needle::Column(c),
            (Some(_), Some(_)) => return Err(o.err("text", "and option `column` exclude each other")),
            (None, None) => return Err(o.err("text", "(or `column`) is required")),
        };
        Ok(Contains {
            needle,
            case_sensitive: o.bool("case_sensitive")?.unwrap_or(true),
        })
    }
}

impl RewardFn for Contains {
    fn name(&self) -> &str {
        "contains"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let needle = match &self.needle {
            Needle::Text(t) => t.clone(),
            Needle::Column(c) => {
                let t = column_text("contains", s, c)?.trim().to_string();
                if t.is_empty() {
                    return Err(RewardError::new("contains", format!("column `{c}` is empty")));
                }
                t
            }
        };
        Ok(score_bool(if self.case_sensitive {
            s.completion.contains(&needle)
        } else {
            s.completion.to_lowercase().contains(&needle.to_lowercase())
        }))
    }
}

/// `regex`: the completion matches `pattern` (Rust `regex` syntax) anywhere; anchor it with
/// `^…$` to match the whole text.
#[derive(Clone, Debug)]
pub struct RegexMatch {
    re: Regex,
}

impl RegexMatch {
    /// Reads the required option `pattern`; an invalid pattern is an error naming it.
    pub(crate) fn from_options(o: &mut Options) -> Result<RegexMatch, String> {
        let pattern = o
            .string("pattern")?
            .ok_or_else(|| o.err("pattern", "is required"))?;
        let re = Regex::new(&pattern).map_err(|e| o.err("pattern", format!("is not a valid regex: {e}")))?;
        Ok(RegexMatch { re })
    }
}

impl RewardFn for RegexMatch {
    fn name(&self) -> &str {
        "regex"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        Ok(score_bool(self.re.is_match(s.completion)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cols, score};
    use super::super::{Sample, from_config};
    use serde_json::json;

    #[test]
    fn exact_match_trims_and_respects_case() {
        let f = from_config("exact_match", &json!(null)).unwrap();
        let c = cols(json!({"answer": " Paris\n"}));
        assert_eq!(score(&*f, "  Paris ", &c), 1.0);
        assert_eq!(score(&*f, "paris", &c), 0.0);
        assert_eq!(score(&*f, "Paris, France", &c), 0.0);
        let f = from_config("exact_match", &json!({"column": "city", "case_sensitive": false})).unwrap();
        assert_eq!(score(&*f, "PARIS", &cols(json!({"city": "Paris"}))), 1.0);
        assert_eq!(score(&*f, "Lyon", &cols(json!({"city": "Paris"}))), 0.0);
        let e = f
            .score(&Sample {
                prompt: "",
                completion: "x",
                columns: &cols(json!({"answer": "x"})),
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "exact_match: column `city` is missing");
    }

    #[test]
    fn contains_text_or_column() {
        let f = from_config("contains", &json!({"text": "because"})).unwrap();
        let c = cols(json!({}));
        assert_eq!(score(&*f, "yes, because it is", &c), 1.0);
        assert_eq!(score(&*f, "Because it is", &c), 0.0);
        let f = from_config("contains", &json!({"text": "because", "case_sensitive": false})).unwrap();
        assert_eq!(score(&*f, "Because it is", &c), 1.0);
        let f = from_config("contains", &json!({"column": "name"})).unwrap();
        let c = cols(json!({"name": "Ada"}));
        assert_eq!(score(&*f, "It was Ada Lovelace.", &c), 1.0);
        assert_eq!(score(&*f, "It was Grace Hopper.", &c), 0.0);
        let e = from_config("contains", &json!({})).err().unwrap();
        assert!(e.contains("`text`") && e.contains("required"), "{e}");
        let e = from_config("contains", &json!({"text": "a", "column": "b"}))
            .err()
            .unwrap();
        assert!(e.contains("exclude"), "{e}");
    }

    #[test]
    fn regex_searches_and_rejects_bad_patterns() {
        let f = from_config("regex", &json!({"pattern": r"\d{3}-\d{4}"})).unwrap();
        let c = cols(json!({}));
        assert_eq!(score(&*f, "call 555-1234 now", &c), 1.0);
        assert_eq!(score(&*f, "call 55-1234 now", &c), 0.0);
        let e = from_config("regex", &json!({"pattern": "(unclosed"}))
            .err()
            .unwrap();
        assert!(
            e.starts_with("regex: option `pattern` is not a valid regex"),
            "{e}"
        );
        let e = from_config("regex", &json!({})).err().unwrap();
        assert_eq!(e, "regex: option `pattern` is required");
    }
}
