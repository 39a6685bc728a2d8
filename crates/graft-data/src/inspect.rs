//! `graft data inspect`: what graft will train on, before it trains.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::dataset::{self, DatasetFormat, LoadOptions, Record, RowError};
use crate::error::Result;
use crate::sample::{self, LossMode, TokenizeOptions, Truncation};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// What to inspect and how.
#[derive(Clone, Debug)]
pub struct InspectOptions {
    /// Force a dataset format.
    pub format: Option<DatasetFormat>,
    /// Maximum sequence length; longer rows are reported as truncated.
    pub max_len: usize,
    /// Which tokens are trained.
    pub loss: LossMode,
    /// Truncation policy.
    pub truncation: Truncation,
    /// Which valid row to show rendered (0 = first).
    pub sample_row: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            format: None,
            max_len: 2048,
            loss: LossMode::AssistantOnly,
            truncation: Truncation::KeepStart,
            sample_row: 0,
        }
    }
}

/// A row longer than the maximum length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruncatedRow {
    /// Source file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// Tokens before truncation.
    pub tokens: usize,
}

/// A row-level warning (`file:line: message`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowWarning {
    /// Source file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is odd.
    pub message: String,
}

/// Everything `graft data inspect` prints.
#[derive(Clone, Debug, Default)]
pub struct InspectReport {
    /// The inspected path.
    pub path: PathBuf,
    /// Each file with its format.
    pub formats: Vec<(PathBuf, DatasetFormat)>,
    /// Valid rows.
    pub rows: usize,
    /// Token length of every tokenized sequence (before truncation).
    pub lengths: Vec<usize>,
    /// Maximum length used.
    pub max_len: usize,
    /// Loss mode used.
    pub loss: LossMode,
    /// Rows over the maximum length.
    pub truncated: Vec<TruncatedRow>,
    /// Plain-text rows over the maximum length, split into chunks instead of truncated.
    pub split_rows: usize,
    /// Tokens after truncation.
    pub total_tokens: usize,
    /// Trained (target) tokens after truncation.
    pub trained_tokens: usize,
    /// Rows whose doubled BOS was collapsed.
    pub bos_deduplicated: usize,
    /// Assistant turns without an end-of-turn token that got EOS appended.
    pub appended_eos: usize,
    /// Assistant turns without an end-of-turn token left as is.
    pub missing_end_of_turn: usize,
    /// Rows where the template renders the last turn unlike its prefixes.
    pub not_prefix_stable: usize,
    /// The sample shown: its location and text with trained spans in `[[…]]`.
    pub sample: Option<(PathBuf, usize, String)>,
    /// Row warnings.
    pub warnings: Vec<RowWarning>,
    /// Invalid rows, `file:line: reason`.
    pub invalid: Vec<RowError>,
}

/// Loads, renders and tokenizes a dataset and summarises it. Invalid rows are collected, not
/// fatal, so that all of them can be listed.
pub fn inspect(
    path: &Path,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &InspectOptions,
) -> Result<InspectReport> {
    let ds = dataset::load(
        path,
        &LoadOptions {
            format: opts.format,
            skip_invalid: true,
        },
    )?;
    let topts = TokenizeOptions {
        loss: opts.loss,
        max_len: Some(opts.max_len),
        truncation: opts.truncation,
        ..Default::default()
    };
    let mut report = InspectReport {
        path: path.to_path_buf(),
        formats: ds.formats.clone(),
        max_len: opts.max_len,
        loss: opts.loss,
        invalid: ds.invalid.clone(),
        ..Default::default()
    };
    let mut shown = false;
    let mut valid_index = 0usize;
    for row in &ds.rows {
        for w in &row.warnings {
            report.warnings.push(RowWarning {
                file: row.file.to_path_buf(),
                line: row.line,
                message: w.clone(),
            });
        }
        let built = match sample::build_record(&row.record, tok, template, &topts) {
            Ok(b) => b,
            Err(e) => {
                report.invalid.push(RowError {
                    file: row.file.clone(),
                    line: row.line,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        report.rows += 1;
        if !shown
            && valid_index >= opts.sample_row
            && let Some(first) = built.first()
        {
            let mut text = sample::mark_trained(first, tok);
            if let Record::Preference(_) = row.record {
                text = format!("(chosen)\n{text}");
            }
            report.sample = Some((row.file.to_path_buf(), row.line, text));
            shown = true;
        }
        valid_index += 1;
        let mut truncated_here = 0usize;
        let splits = matches!(row.record, Record::Text(_)) && opts.truncation != Truncation::DropRow;
        for b in built {
            report.lengths.push(b.ids.len());
            if b.ids.len() > opts.max_len {
                if splits {
                    report.split_rows += 1;
                    report.total_tokens += b.ids.len();
                    report.trained_tokens += b
                        .split_chunks(opts.max_len)
                        .iter()
                        .map(|c| c.trained_count())
                        .sum::<usize>();
                    continue;
                }
                truncated_here = truncated_here.max(b.ids.len());
            }
            let n = &b.notes;
            report.bos_deduplicated += n.bos_deduplicated as usize;
            report.appended_eos += n.appended_eos as usize;
            report.missing_end_of_turn += n.missing_end_of_turn as usize;
            report.not_prefix_stable += n.template_not_prefix_stable as usize;
            if let Some(s) = b.finish(&topts) {
                report.total_tokens += s.input_ids.len();
                report.trained_tokens += s.trained_count();
            }
        }
        if truncated_here > 0 {
            report.truncated.push(TruncatedRow {
                file: row.file.to_path_buf(),
                line: row.line,
                tokens: truncated_here,
            });
        }
    }
    report
        .invalid
        .sort_by(|a, b| (a.file.as_ref(), a.line).cmp(&(b.file.as_ref(), b.line)));
    Ok(report)
}

impl InspectReport {
    /// `(low, high, count)` buckets of sequence lengths: ten equal-width buckets of a round width.
    pub fn histogram(&self) -> Vec<(usize, usize, usize)> {
        let Some(&max) = self.lengths.iter().max() else {
            return vec![];
        };
        let raw = max.div_ceil(10).max(1);
        let magnitude = 10usize.pow((raw as f64).log10().floor() as u32);
        let width = [1, 2, 5, 10]
            .iter()
            .map(|m| m * magnitude)
            .find(|w| *w >= raw)
            .unwrap_or(raw);
        let buckets = max / width + 1;
        let mut counts = vec![0usize; buckets];
        for &l in &self.lengths {
            counts[l / width] += 1;
        }
        counts
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i * width, (i + 1) * width - 1, c))
            .collect()
    }

    /// What the loss covers, in words, for this dataset's formats and loss mode.
    pub fn loss_description(&self) -> &'static str {
        let all_text =
            !self.formats.is_empty() && self.formats.iter().all(|(_, f)| *f == DatasetFormat::Text);
        let all_chat = self.formats.iter().all(|(_, f)| {
            matches!(
                f,
                DatasetFormat::OpenAiChat | DatasetFormat::ShareGpt | DatasetFormat::Alpaca
            )
        });
        match self.loss {
            _ if all_text => "all tokens (plain text)",
            LossMode::AllTokens => "all tokens",
            LossMode::LastAssistant => "the last assistant turn",
            LossMode::AssistantOnly if all_chat => "assistant turns",
            LossMode::AssistantOnly | LossMode::CompletionOnly => "completions / responses",
        }
    }

    /// Fraction of tokens that are trained.
    pub fn trained_fraction(&self) -> f64 {
        if self.total_tokens == 0 {
            0.0
        } else {
            self.trained_tokens as f64 / self.total_tokens as f64
        }
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset:  {}", self.path.display())?;
        let mut formats: Vec<String> = self.formats.iter().map(|(_, fm)| fm.to_string()).collect();
        formats.dedup();
        writeln!(
            f,
            "format:   {} ({} file{})",
            formats.join(", "),
            self.formats.len(),
            if self.formats.len() == 1 { "" } else { "s" }
        )?;
        writeln!(f, "rows:     {} valid, {} invalid", self.rows, self.invalid.len())?;
        let mut sorted = self.lengths.clone();
        sorted.sort_unstable();
        if let (Some(min), Some(max)) = (sorted.first(), sorted.last()) {
            let mean = sorted.iter().sum::<usize>() as f64 / sorted.len() as f64;
            writeln!(
                f,
                "tokens:   {} sequences; length min {min}, median {}, mean {mean:.1}, max {max}",
                sorted.len(),
                sorted[sorted.len() / 2]
            )?;
        }
        writeln!(
            f,
            "trained:  {} of {} tokens ({:.1}%), loss on {}",
            self.trained_tokens,
            self.total_tokens,
            100.0 * self.trained_fraction(),
            self.loss_description()
        )?;
        let hist = self.histogram();
        if !hist.is_empty() {
            writeln!(f, "length histogram (tokens):")?;
            let peak = hist.iter().map(|h| h.2).max().unwrap_or(1).max(1);
            let digits = hist.last().map(|h| h.1.to_string().len()).unwrap_or(1);
            for (lo, hi, count) in &hist {
                let bar = "#".repeat((count * 40).div_ceil(peak));
                writeln!(f, "  {lo:>digits$}-{hi:<digits$} | {bar} {count}")?;
            }
        }
        writeln!(
            f,
            "truncated: {} row(s) longer than max length {}",
            self.truncated.len(),
            self.max_len
        )?;
        const LISTED: usize = 20;
        for t in self.truncated.iter().take(LISTED) {
            writeln!(
                f,
                "  {}:{}: {} tokens > {}",
                t.file.display(),
                t.line,
                t.tokens,
                self.max_len
            )?;
        }
        if self.truncated.len() > LISTED {
            writeln!(f, "  … and {} more", self.truncated.len() - LISTED)?;
        }
        if self.split_rows > 0 {
            writeln!(
                f,
                "split:    {} long text row(s) split into chunks of at most {} tokens (not truncated)",
                self.split_rows, self.max_len
            )?;
        }
        if self.bos_deduplicated > 0 {
            writeln!(
                f,
                "note: doubled BOS (template + tokenizer) collapsed to one in {} sequence(s)",
                self.bos_deduplicated
            )?;
        }
        if self.appended_eos > 0 {
            writeln!(
                f,
                "note: the template closes {} assistant turn(s) with no end-of-turn token; EOS was appended and trained",
                self.appended_eos
            )?;
        }
        if self.missing_end_of_turn > 0 {
            writeln!(
                f,
                "warning: {} trained assistant turn(s) have no end-of-turn token: the model will not learn to stop",
                self.missing_end_of_turn
            )?;
        }
        if self.not_prefix_stable > 0 {
            writeln!(
                f,
                "note: the template renders the last turn differently from earlier ones in {} sequence(s); spans were aligned",
                self.not_prefix_stable
            )?;
        }
        if !self.warnings.is_empty() {
            writeln!(f, "warnings ({}):", self.warnings.len())?;
            for w in &self.warnings {
                writeln!(f, "  {}:{}: {}", w.file.display(), w.line, w.message)?;
            }
        }
        if let Some((file, line, text)) = &self.sample {
            writeln!(f, "sample {}:{} (trained tokens in [[ ]]):", file.display(), line)?;
            writeln!(f, "{text}")?;
            writeln!(f, "(end of sample)")?;
        }
        if !self.invalid.is_empty() {
            writeln!(f, "invalid rows ({}):", self.invalid.len())?;
            for e in &self.invalid {
                writeln!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_uses_round_buckets() {
        let r = InspectReport {
            lengths: vec![3, 15, 17, 99, 100],
            ..Default::default()
        };
        let h = r.histogram();
        assert_eq!(h[0], (0, 9, 1));
        assert_eq!(h[1], (10, 19, 2));
        assert_eq!(h.last().unwrap(), &(100, 109, 1));
        assert_eq!(h.iter().map(|b| b.2).sum::<usize>(), 5);
        assert!(InspectReport::default().histogram().is_empty());
    }
}
