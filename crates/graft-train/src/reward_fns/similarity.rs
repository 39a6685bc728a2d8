//! The `text_similarity` grader's metrics, computed as the Python reference libraries compute
//! them (checked against them by `tests/fixtures/graders/text_similarity.json`, written by
//! `scripts/gen_grader_fixture.py`):
//!
//! | metric | reference | tokens |
//! |---|---|---|
//! | `fuzzy_match` | rapidfuzz `fuzz.ratio(input, reference) / 100` (normalised Indel similarity) | characters |
//! | `bleu` | nltk `sentence_bleu([reference], input)`: 4-gram, uniform weights, no smoothing | whitespace split |
//! | `gleu` | nltk `sentence_gleu([reference], input)`: 1- to 4-grams | whitespace split |
//! | `meteor` | nltk `meteor_score([reference], input)` with exact matches only (see below) | whitespace split, lower-cased |
//! | `rouge_1`…`rouge_5`, `rouge_l` | rouge-score `RougeScorer([...]).score(reference, input)`, F-measure, no stemmer | rouge-score's: lower-case, runs of `[^a-z0-9]` are spaces |
//!
//! OpenAI names the libraries' metrics but not their settings; these are each library's
//! defaults. METEOR differs from nltk's default: nltk also matches Porter stems and WordNet
//! synonyms, and WordNet is a data download graft does not ship, so graft (and the fixture,
//! which passes nltk an identity stemmer and an empty WordNet) matches exact lower-cased words
//! only. For words that match exactly the scores are the same.

use std::collections::HashMap;
use std::hash::Hash;

/// rapidfuzz `fuzz.ratio / 100`: `2·LCS / (|a| + |b|)` over characters; 1 when both are empty.
pub fn fuzzy_match(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let total = a.len() + b.len();
    if total == 0 {
        return 1.0;
    }
    let distance = total - 2 * lcs_len(&a, &b);
    1.0 - distance as f64 / total as f64
}

/// The length of the longest common subsequence.
fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Counts of the `n`-grams of `tokens`.
fn ngrams<T: Hash + Eq>(tokens: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut out = HashMap::new();
    if n > 0 && tokens.len() >= n {
        for w in tokens.windows(n) {
            *out.entry(w).or_insert(0) += 1;
        }
    }
    out
}

/// nltk `sentence_bleu([reference.split()], input.split())`.
pub fn bleu(input: &str, reference: &str) -> f64 {
    let hyp: Vec<&str> = input.split_whitespace().collect();
    let refs: Vec<&str> = reference.split_whitespace().collect();
    // modified (clipped) precisions p_1..p_4 as (numerator, denominator)
    let p: Vec<(usize, usize)> = (1..=4)
        .map(|n| {
            let h = ngrams(&hyp, n);
            let r = ngrams(&refs, n);
            let clipped: usize = h.iter().map(|(g, c)| (*c).min(*r.get(g).unwrap_or(&0))).sum();
            let total: usize = h.values().sum();
            (clipped, total.max(1))
        })
        .collect();
    if p[0].0 == 0 {
        return 0.0;
    }
    let (h, r) = (hyp.len(), refs.len());
    let bp = if h > r {
        1.0
    } else if h == 0 {
        0.0
    } else {
        (1.0 - r as f64 / h as f64).exp()
    };
    // nltk's method0 "smoothing": a zero precision counts as the smallest positive float
    let log_sum: f64 = p
        .iter()
        .map(|&(num, den)| {
            let x = if num == 0 {
                f64::MIN_POSITIVE
            } else {
                num as f64 / den as f64
            };
            0.25 * x.ln()
        })
        .sum();
    bp * log_sum.exp()
}

/// nltk `sentence_gleu([reference.split()], input.split())`: matching 1- to 4-grams over the
/// larger of the two n-gram totals.
pub fn gleu(input: &str, reference: &str) -> f64 {
    let hyp: Vec<&str> = input.split_whitespace().collect();
    let refs: Vec<&str> = reference.split_whitespace().collect();
    let (mut matched, mut hyp_total, mut ref_total) = (0usize, 0usize, 0usize);
    for n in 1..=4 {
        let h = ngrams(&hyp, n);
        let r = ngrams(&refs, n);
        matched += h
            .iter()
            .map(|(g, c)| (*c).min(*r.get(g).unwrap_or(&0)))
            .sum::<usize>();
        hyp_total += h.values().sum::<usize>();
        ref_total += r.values().sum::<usize>();
    }
    let all = hyp_total.max(ref_total);
    if all == 0 {
        0.0
    } else {
        matched as f64 / all as f64
    }
}

/// nltk `meteor_score([reference], input)` (α 0.9, β 3, γ 0.5) with exact matches of
/// lower-cased whitespace tokens only; see the [module docs](self).
pub fn meteor(input: &str, reference: &str) -> f64 {
    let hyp: Vec<String> = input.split_whitespace().map(str::to_lowercase).collect();
    let refs: Vec<String> = reference.split_whitespace().map(str::to_lowercase).collect();
    // nltk's `_match_enums`: from the last hypothesis word back, each takes the last unmatched
    // equal reference word.
    let mut free: Vec<usize> = (0..refs.len()).collect();
    let mut matches: Vec<(usize, usize)> = Vec::new();
    for i in (0..hyp.len()).rev() {
        if let Some(k) = (0..free.len()).rev().find(|&k| refs[free[k]] == hyp[i]) {
            matches.push((i, free.remove(k)));
        }
    }
    if matches.is_empty() || hyp.is_empty() || refs.is_empty() {
        return 0.0;
    }
    matches.sort_unstable();
    let m = matches.len() as f64;
    let precision = m / hyp.len() as f64;
    let recall = m / refs.len() as f64;
    let (alpha, beta, gamma) = (0.9, 3.0, 0.5);
    let fmean = precision * recall / (alpha * precision + (1.0 - alpha) * recall);
    let chunks = 1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count();
    let penalty = gamma * (chunks as f64 / m).powf(beta);
    (1.0 - penalty) * fmean
}

/// rouge-score's default tokenizer without stemming: lower-case, every run of characters
/// outside `[a-z0-9]` is a separator.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The F-measure of `precision` and `recall`, 0 when both are 0.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// rouge-score ROUGE-`n` F-measure of `input` (the prediction) against `reference` (the target).
pub fn rouge_n(input: &str, reference: &str, n: usize) -> f64 {
    let (pred, target) = (rouge_tokens(input), rouge_tokens(reference));
    let (p, t) = (ngrams(&pred, n), ngrams(&target, n));
    let overlap: usize = t.iter().map(|(g, c)| (*c).min(*p.get(g).unwrap_or(&0))).sum();
    let precision = overlap as f64 / p.values().sum::<usize>().max(1) as f64;
    let recall = overlap as f64 / t.values().sum::<usize>().max(1) as f64;
    fmeasure(precision, recall)
}

/// rouge-score ROUGE-L (longest common subsequence of tokens) F-measure.
pub fn rouge_l(input: &str, reference: &str) -> f64 {
    let (pred, target) = (rouge_tokens(input), rouge_tokens(reference));
    if pred.is_empty() || target.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&target, &pred) as f64;
    fmeasure(lcs / pred.len() as f64, lcs / target.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// graft's score of `metric` (a fixture's name for it).
    fn score(metric: &str, input: &str, reference: &str) -> f64 {
        match metric {
            "fuzzy_match" => fuzzy_match(input, reference),
            "bleu" => bleu(input, reference),
            "gleu" => gleu(input, reference),
            "meteor" => meteor(input, reference),
            "rouge_l" => rouge_l(input, reference),
            m => {
                let n = m.strip_prefix("rouge_").and_then(|n| n.parse().ok()).unwrap();
                rouge_n(input, reference, n)
            }
        }
    }

    #[test]
    fn matches_the_reference_libraries() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/graders/text_similarity.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let fixture: Value = serde_json::from_str(&text).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        let mut checked = 0;
        for case in cases {
            let input = case["input"].as_str().unwrap();
            let reference = case["reference"].as_str().unwrap();
            for (metric, want) in case["scores"].as_object().unwrap() {
                let want = want.as_f64().unwrap();
                let got = score(metric, input, reference);
                assert!(
                    (got - want).abs() <= 1e-9,
                    "{metric}({input:?}, {reference:?}): graft {got}, reference {want}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, cases.len() * 10);
    }

    #[test]
    fn identical_and_disjoint_texts() {
        let s = "the cat sat on the mat";
        for m in ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_4", "rouge_l"] {
            assert!((score(m, s, s) - 1.0).abs() < 1e-12, "{m}");
            assert_eq!(score(m, "dog", "cat"), 0.0, "{m}");
        }
        // one chunk of 6 matches: 1 - 0.5 (1/6)^3 of fmean 1
        assert!((meteor(s, s) - (1.0 - 0.5 / 216.0)).abs() < 1e-12);
        assert_eq!(fuzzy_match("", ""), 1.0);
        assert_eq!(rouge_l("", "x"), 0.0);
        assert_eq!(
            rouge_tokens("Hello, World! ÉTÉ 42x"),
            ["hello", "world", "t", "42x"]
        );
    }
}
