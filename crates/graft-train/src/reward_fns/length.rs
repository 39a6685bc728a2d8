//! `length`: the completion's length against a target or a maximum, in characters or words
//! (tokens are not available to reward functions).
//!
//! With `target = T`: `1 − |len − T| / T` clipped to `[0, 1]`. With `max = M` instead: 1.0 if
//! `len ≤ M`, else 0.0. Option `unit` is `"chars"` (Unicode scalar values of the trimmed
//! completion; the default) or `"words"` (whitespace-separated).

use super::{Options, RewardError, RewardFn, Sample, score_bool};

/// What `length` counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    /// Characters of the trimmed completion.
    Chars,
    /// Whitespace-separated words.
    Words,
}

/// What `length` scores against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// Closeness to this length.
    Target(f64),
    /// At most this length.
    Max(f64),
}

/// The `length` reward function.
#[derive(Clone, Debug)]
pub struct Length {
    goal: Goal,
    unit: Unit,
}

impl Length {
    /// Reads the options: exactly one of `target` (> 0) and `max` (≥ 0), and `unit`.
    pub(crate) fn from_options(o: &mut Options) -> Result<Length, String> {
        let goal = match (o.number("target", true)?, o.number("max", false)?) {
            (Some(t), None) => Goal::Target(t),
            (None, Some(m)) => Goal::Max(m),
            (Some(_), Some(_)) => return Err(o.err("target", "and option `max` exclude each other")),
            (None, None) => return Err(o.err("target", "(or `max`) is required")),
        };
        let unit = match o.string("unit")?.as_deref() {
            None | Some("chars") => Unit::Chars,
            Some("words") => Unit::Words,
            Some(u) => return Err(o.err("unit", format!("must be \"chars\" or \"words\", not \"{u}\""))),
        };
        Ok(Length { goal, unit })
    }

    /// The length of `text` in this function's unit.
    pub fn measure(&self, text: &str) -> usize {
        match self.unit {
            Unit::Chars => text.trim().chars().count(),
            Unit::Words => text.split_whitespace().count(),
        }
    }
}

impl RewardFn for Length {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let len = self.measure(s.completion) as f64;
        Ok(match self.goal {
            Goal::Target(t) => (1.0 - (len - t).abs() / t).clamp(0.0, 1.0),
            Goal::Max(m) => score_bool(len <= m),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_config;
    use super::super::tests::{cols, score};
    use serde_json::json;

    #[test]
    fn target_in_chars_and_words() {
        let c = cols(json!({}));
        let f = from_config("length", &json!({"target": 10})).unwrap();
        assert_eq!(score(&*f, "0123456789", &c), 1.0);
        assert_eq!(score(&*f, "  01234  \n", &c), 0.5);
        assert_eq!(score(&*f, "012345678901234", &c), 0.5);
        assert_eq!(score(&*f, &"x".repeat(25), &c), 0.0);
        assert_eq!(score(&*f, "", &c), 0.0);
        assert_eq!(score(&*f, "ééééééééé", &c), 0.9);
        let f = from_config("length", &json!({"target": 4, "unit": "words"})).unwrap();
        assert_eq!(score(&*f, "one two\nthree   four", &c), 1.0);
        assert_eq!(score(&*f, "one two three four five", &c), 0.75);
    }

    #[test]
    fn max_is_a_cutoff() {
        let c = cols(json!({}));
        let f = from_config("length", &json!({"max": 3, "unit": "words"})).unwrap();
        assert_eq!(score(&*f, "a b c", &c), 1.0);
        assert_eq!(score(&*f, "a b c d", &c), 0.0);
        let f = from_config("length", &json!({"max": 0})).unwrap();
        assert_eq!(score(&*f, " ", &c), 1.0);
    }

    #[test]
    fn bad_options_name_the_key() {
        for (args, key) in [
            (json!({}), "target"),
            (json!({"target": 0}), "target"),
            (json!({"target": -3}), "target"),
            (json!({"target": 3, "max": 4}), "target"),
            (json!({"max": "10"}), "max"),
            (json!({"max": 10, "unit": "tokens"}), "unit"),
        ] {
            let e = from_config("length", &args).err().unwrap();
            assert!(e.starts_with(&format!("length: option `{key}`")), "{args}: {e}");
        }
    }
}
