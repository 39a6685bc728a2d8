//! `math`: is the model's final answer equivalent to the reference? 1.0 or 0.0.
//!
//! The model's answer is the content of its last `\boxed{…}` (balanced braces), else what follows
//! the last GSM8K-style `#### `, else the last number in the text. The reference is the row's
//! `answer` column (option `column`): a GSM8K solution ending in `#### n`, a `\boxed{…}`, or plain
//! LaTeX as in MATH-500. Both are normalised ([`normalize`]: `$`, spaces, `\left`/`\right`,
//! `\!`/`\,`, trailing `.`, `\text{…}` units, degrees, thousands commas, `\dfrac`, `\frac12`, …)
//! and compared as numbers when both parse as one (integers, decimals, `a/b`, `\frac{a}{b}`,
//! percentages — `50\%` equals both `50` and `0.5`) with relative tolerance 1e-6 (two integers
//! exactly), else as strings.

use super::{Options, RewardError, RewardFn, Sample, column_text, score_bool};
use regex::Regex;
use std::sync::OnceLock;

/// The `math` reward function.
#[derive(Clone, Debug)]
pub struct Math {
    column: String,
}

impl Math {
    /// Reads the options: `column` (default `answer`).
    pub(crate) fn from_options(o: &mut Options) -> Result<Math, String> {
        Ok(Math {
            column: o.string("column")?.unwrap_or_else(|| "answer".into()),
        })
    }
}

impl RewardFn for Math {
    fn name(&self) -> &str {
        "math"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let reference = column_text("math", s, &self.column)?;
        let reference = extract_reference(&reference);
        Ok(match extract_answer(s.completion) {
            Some(answer) => score_bool(equivalent(&answer, &reference)),
            None => 0.0,
        })
    }
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`) in `text`, braces balanced; also the
/// brace-less `\boxed 5` form.
pub fn last_boxed(text: &str) -> Option<String> {
    let at = match (text.rfind("\\boxed"), text.rfind("\\fbox")) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    let rest = &text[at..];
    let rest = rest
        .strip_prefix("\\boxed")
        .or_else(|| rest.strip_prefix("\\fbox"))?;
    if let Some(body) = rest.trim_start().strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(body[..i].to_string());
                    }
                }
                _ => {}
            }
        }
        None
    } else if rest.starts_with(' ') {
        let word: String = rest
            .trim_start()
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        (!word.is_empty()).then_some(word)
    } else {
        None
    }
}

fn last_number(text: &str) -> Option<String> {
    static NUM: OnceLock<Regex> = OnceLock::new();
    let re =
        NUM.get_or_init(|| Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+").unwrap());
    re.find_iter(text).last().map(|m| m.as_str().to_string())
}

fn after_hashes(text: &str) -> Option<String> {
    let at = text.rfind("####")?;
    let line = text[at + 4..].lines().next().unwrap_or("").trim();
    (!line.is_empty()).then(|| line.to_string())
}

/// The model's final answer in `completion`: last `\boxed{…}`, else `#### n`, else the last number.
pub fn extract_answer(completion: &str) -> Option<String> {
    last_boxed(completion)
        .or_else(|| after_hashes(completion))
        .or_else(|| last_number(completion))
}

/// The reference answer in a dataset column: after `####` (GSM8K), inside `\boxed{…}`, or the
/// whole text (MATH-500's `answer`).
pub fn extract_reference(column: &str) -> String {
    after_hashes(column)
        .or_else(|| last_boxed(column))
        .unwrap_or_else(|| column.trim().to_string())
}

/// The content of the braces group starting at `s[0] == '{'` and the rest after it.
fn braced(s: &str) -> Option<(&str, &str)> {
    let body = s.strip_prefix('{')?;
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&body[..i], &body[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Replaces `\text{…}`-like groups: a unit after a number (`5\text{ cm}`) is dropped, anything
/// else (`\text{(C)}`) is replaced by its content.
fn strip_text_groups(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    'outer: while !rest.is_empty() {
        for cmd in ["\\text", "\\mbox", "\\textbf", "\\mathrm", "\\textrm"] {
            if let Some(after) = rest.strip_prefix(cmd)
                && let Some((content, tail)) = braced(after.trim_start())
            {
                let prev = out.trim_end().chars().last();
                let unit = matches!(prev, Some(c) if c.is_ascii_digit() || c == '}' || c == '.')
                    && content.trim_start().starts_with(|c: char| c.is_alphabetic());
                if !unit {
                    out.push_str(content);
                }
                rest = tail;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// One argument of a LaTeX command at the start of `s`: a braces group, a `\command` or one
/// character; and the rest.
fn next_arg(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('{') {
        return braced(s);
    }
    if let Some(name) = s.strip_prefix('\\') {
        let n = name
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(name.len());
        return (n > 0).then(|| s.split_at(n + 1));
    }
    let c = s.chars().next().filter(|c| c.is_ascii_alphanumeric())?;
    Some(s.split_at(c.len_utf8()))
}

/// `\frac12` → `\frac{1}{2}`, `\frac1{2}`, `\frac{1}2` likewise, `\frac\pi2` → `\frac{\pi}{2}`.
fn fix_fracs(s: &str) -> String {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        out.push_str("\\frac");
        let mut rest = part;
        for _ in 0..2 {
            match next_arg(rest) {
                Some((arg, tail)) => {
                    out.push('{');
                    out.push_str(arg);
                    out.push('}');
                    rest = tail;
                }
                None => break,
            }
        }
        out.push_str(rest);
    }
    out
}

/// An answer in the canonical form the comparison uses.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    s = strip_text_groups(&s);
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("~", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\%", "%"),
        ("{,}", ","),
        ("\\$", ""),
        ("$", ""),
    ] {
        s = s.replace(from, to);
    }
    s.retain(|c| !c.is_whitespace());
    while let Some(t) = s.strip_suffix('.') {
        s = t.to_string();
    }
    // `x = 5`, `k=-2`: a short left-hand side is a label
    if let Some((lhs, rhs)) = s.split_once('=')
        && lhs.chars().count() <= 2
        && !rhs.contains('=')
        && !rhs.is_empty()
    {
        s = rhs.to_string();
    }
    s = fix_fracs(&s);
    static THOUSANDS: OnceLock<Regex> = OnceLock::new();
    let re = THOUSANDS.get_or_init(|| Regex::new(r"^-?\d{1,3}(,\d{3})+(\.\d+)?%?$").unwrap());
    if re.is_match(&s) {
        s.retain(|c| c != ',');
    }
    s
}

/// The value of a normalised answer that is a number (`12`, `-0.5`, `.5`, `3/4`, `\frac{3}{4}`,
/// `-\frac{3}{4}`, `50%`): `(value, was_a_percentage)`.
pub fn parse_number(s: &str) -> Option<(f64, bool)> {
    let (s, percent) = match s.strip_suffix('%') {
        Some(t) => (t, true),
        None => (s, false),
    };
    fn plain(s: &str) -> Option<f64> {
        static PLAIN: OnceLock<Regex> = OnceLock::new();
        let re = PLAIN.get_or_init(|| Regex::new(r"^[+-]?(\d+\.?\d*|\.\d+)$").unwrap());
        re.is_match(s).then(|| s.parse().ok()).flatten()
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(t) if t.starts_with("\\frac") => (true, t),
        _ => (false, s),
    };
    let v = if let Some(f) = body.strip_prefix("\\frac") {
        let (a, rest) = braced(f)?;
        let (b, rest) = braced(rest)?;
        if !rest.is_empty() {
            return None;
        }
        plain(a)? / plain(b)?
    } else if let Some((a, b)) = body.split_once('/') {
        plain(a)? / plain(b)?
    } else {
        plain(body)?
    };
    let v = if neg { -v } else { v };
    v.is_finite().then_some((v, percent))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

/// Whether two answers are the same after [`normalize`]: numerically when both are numbers —
/// exactly when both are integers, else with relative tolerance 1e-6 (a percentage also matches
/// its value over 100) — else as strings.
pub fn equivalent(answer: &str, reference: &str) -> bool {
    let (a, r) = (normalize(answer), normalize(reference));
    if a.is_empty() || r.is_empty() {
        return false;
    }
    let integer = |t: &str| {
        let d = t.strip_prefix('-').unwrap_or(t);
        !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
    };
    match (parse_number(&a), parse_number(&r)) {
        // two integers are equal or not: 1450001 is not 1450000 within 1e-6
        (Some((x, _)), Some((y, _))) if integer(&a) && integer(&r) => x == y,
        (Some((x, px)), Some((y, py))) => {
            let xs = [Some(x), px.then(|| x / 100.0)];
            let ys = [Some(y), py.then(|| y / 100.0)];
            xs.iter()
                .flatten()
                .any(|x| ys.iter().flatten().any(|y| close(*x, *y)))
        }
        _ => a == r,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cols, score};
    use super::super::{RewardFn, from_config};
    use super::*;
    use serde_json::{Value, json};
    use std::path::PathBuf;

    fn math() -> Box<dyn RewardFn> {
        from_config("math", &Value::Null).unwrap()
    }

    fn s(completion: &str, answer: &str) -> f64 {
        score(&*math(), completion, &cols(json!({ "answer": answer })))
    }

    #[test]
    fn boxed_extraction_balances_braces_and_takes_the_last() {
        assert_eq!(
            last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}.").unwrap(),
            r"\frac{1}{2}"
        );
        assert_eq!(last_boxed(r"so \boxed{\{1,2\}} x").unwrap(), r"\{1,2\}");
        assert_eq!(last_boxed(r"$\boxed 7$").unwrap(), "7");
        assert_eq!(last_boxed(r"\boxed{unclosed"), None);
        assert_eq!(extract_answer("so 3 apples and then 12.\n#### 15").unwrap(), "15");
        assert_eq!(extract_answer("3 plus 4 is 7.").unwrap(), "7");
        assert_eq!(extract_answer("costs $1,250.50 total").unwrap(), "1,250.50");
        assert_eq!(extract_answer("no digits here"), None);
    }

    #[test]
    fn hand_written_equivalences() {
        assert_eq!(s(r"The answer is $\boxed{\frac{1}{2}}$.", "0.5"), 1.0);
        assert_eq!(s(r"\boxed{1,000}", "1000"), 1.0);
        assert_eq!(s(r"\boxed{\dfrac{3}{4}}", r"\frac34"), 1.0);
        assert_eq!(s(r"\boxed{\tfrac{3}{4}}", "3/4"), 1.0);
        assert_eq!(s(r"\boxed{10\text{ cm}}", "10"), 1.0);
        assert_eq!(s(r"\boxed{90^\circ}", "90"), 1.0);
        assert_eq!(s(r"\boxed{90^{\circ}}", r"90^\circ"), 1.0);
        assert_eq!(
            s(
                r"\boxed{\left( 3, \frac{\pi}{2} \right)}",
                r"\left( 3, \frac{\pi}{2} \right)"
            ),
            1.0
        );
        assert_eq!(
            s(r"\boxed{(3,\frac\pi2)}", r"\left( 3, \frac{\pi}{2} \right)"),
            1.0
        );
        assert_eq!(s(r"\boxed{50\%}", "0.5"), 1.0);
        assert_eq!(s(r"\boxed{50\%}", "50"), 1.0);
        assert_eq!(s(r"\boxed{x = 5}", "5"), 1.0);
        assert_eq!(s(r"\boxed{-\frac{2}{3}}", "-0.6666666667"), 1.0);
        assert_eq!(s(r"\boxed{1,\!000.}", "1000"), 1.0);
        assert_eq!(s(r"\boxed{\text{(C)}}", "(C)"), 1.0);
        assert_eq!(s("I get 18 dollars.\n#### 18", "She makes $18.\n#### 18"), 1.0);
        assert_eq!(s("so the total is 42", "42"), 1.0);
        assert_eq!(s(r"\boxed{5}", r"\$5"), 1.0);
    }

    #[test]
    fn wrong_answers_score_zero() {
        assert_eq!(s(r"\boxed{\frac{1}{3}}", "0.5"), 0.0);
        assert_eq!(s(r"\boxed{1001}", "1000"), 0.0);
        assert_eq!(s(r"\boxed{\frac{4}{3}}", r"\frac34"), 0.0);
        assert_eq!(s(r"\boxed{(3,\pi)}", r"\left( 3, \frac{\pi}{2} \right)"), 0.0);
        assert_eq!(s("I think 17.\n#### 17", "#### 18"), 0.0);
        // the last boxed wins over an earlier right one
        assert_eq!(s(r"\boxed{18} no wait \boxed{19}", "18"), 0.0);
        assert_eq!(s("I don't know", "18"), 0.0);
        assert_eq!(s(r"\boxed{}", "0"), 0.0);
        // tolerance is relative 1e-6, not looser
        assert_eq!(s(r"\boxed{1.00001}", "1"), 0.0);
        assert_eq!(s(r"\boxed{1.0000001}", "1"), 1.0);
        assert_eq!(s(r"\boxed{1450001}", "1,450,000"), 0.0);
    }

    #[test]
    fn column_option_picks_the_reference() {
        let f = from_config("math", &json!({"column": "solution"})).unwrap();
        let c = cols(json!({"answer": "1", "solution": r"so it is \boxed{7}"}));
        assert_eq!(score(&*f, r"\boxed{7}", &c), 1.0);
        assert_eq!(score(&*f, r"\boxed{1}", &c), 0.0);
        // numeric columns are read too
        assert_eq!(score(&*math(), r"\boxed{3}", &cols(json!({"answer": 3}))), 1.0);
    }

    fn rows(rel: &str) -> Option<Vec<serde_json::Map<String, Value>>> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/datasets")
            .join(rel);
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} not found", path.display());
            return None;
        };
        Some(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| cols(serde_json::from_str(l).unwrap()))
                .collect(),
        )
    }

    #[test]
    fn gsm8k_rows() {
        let Some(rows) = rows("math/gsm8k/test.jsonl") else {
            return;
        };
        assert!(rows.len() > 1000);
        let f = math();
        for (i, row) in rows.iter().enumerate() {
            let reference = row["answer"].as_str().unwrap();
            let n = extract_reference(reference);
            let v: f64 = n
                .replace(',', "")
                .parse()
                .unwrap_or_else(|_| panic!("row {i}: {n}"));
            // the reference solution itself, a boxed answer, and a wrong one
            assert_eq!(score(&*f, reference, row), 1.0, "row {i}");
            assert_eq!(
                score(&*f, &format!("So the answer is $\\boxed{{{n}}}$."), row),
                1.0,
                "row {i}"
            );
            assert_eq!(
                score(&*f, &format!("The answer is {}.", v + 1.0), row),
                0.0,
                "row {i}"
            );
        }
    }

    #[test]
    fn math500_rows() {
        let Some(rows) = rows("math/math500/test.jsonl") else {
            return;
        };
        assert_eq!(rows.len(), 500);
        let f = math();
        let mut failed = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            // the reference solution ends in \boxed{answer}; the answer itself boxed
            let boxed = format!("Thus $\\boxed{{{}}}$.", row["answer"].as_str().unwrap());
            if score(&*f, &boxed, row) != 1.0 {
                failed.push((i, "boxed answer"));
            }
            if score(&*f, row["solution"].as_str().unwrap(), row) != 1.0 {
                failed.push((i, "solution"));
            }
            // the next row's answer is (almost always) wrong
            let next = &rows[(i + 1) % rows.len()];
            let other = format!("\\boxed{{{}}}", next["answer"].as_str().unwrap());
            if score(&*f, &other, row) != 0.0
                && normalize(next["answer"].as_str().unwrap()) != normalize(row["answer"].as_str().unwrap())
            {
                failed.push((i, "next row's answer"));
            }
        }
        assert!(failed.is_empty(), "{} failures: {failed:?}", failed.len());
    }
}
