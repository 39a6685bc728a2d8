//! Text out of token ids while generating: an incremental decoder (same algorithm as
//! `graft_data::DecodeStream`, so the server's text equals `graft generate`'s) and stop-string
//! matching that holds back text which could still become a stop string.

use graft_data::Tokenizer;

/// Incremental detokenizer that does not borrow the tokenizer between calls.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl IncrementalDecoder {
    /// A decoder; `skip_special_tokens` drops special tokens from the text.
    pub fn new(skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// Primes the decoder with context (the prompt) whose text is not emitted, so the first
    /// generated token decodes as it would after that context (leading spaces).
    pub fn prime(&mut self, tok: &Tokenizer, ids: &[u32]) {
        for &id in ids {
            self.step(tok, id);
        }
    }

    /// Adds one id; returns the new text, if any is ready.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Option<String> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let p = tok.decode_raw(&self.ids, self.skip_special_tokens);
            if !p.ends_with('\u{FFFD}') {
                self.prefix = p;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = tok.decode_raw(&self.ids, self.skip_special_tokens);
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') || !text.starts_with(&self.prefix) {
            return None;
        }
        let new_text = text[self.prefix.len()..].to_string();
        let keep = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = tok.decode_raw(&self.ids, self.skip_special_tokens);
        self.prefix_index = keep;
        Some(new_text)
    }

    /// Flushes text held back at the end of generation.
    pub fn finish(&mut self, tok: &Tokenizer) -> Option<String> {
        let text = tok.decode_raw(&self.ids, self.skip_special_tokens);
        self.ids.clear();
        let prefix = std::mem::take(&mut self.prefix);
        self.prefix_index = 0;
        if text.len() > prefix.len() && text.starts_with(&prefix) {
            Some(text[prefix.len()..].to_string())
        } else {
            None
        }
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored); with `include_stop` the stop string
    /// itself is part of the output.
    pub fn new(stops: &[String], include_stop: bool) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop,
            pending: String::new(),
        }
    }

    /// Feeds new text; returns the text that is safe to emit and whether a stop string ended
    /// the output (then nothing after it is ever emitted).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|p| (p, s.len())))
            .min();
        if let Some((pos, len)) = hit {
            let end = if self.include_stop { pos + len } else { pos };
            let out = self.pending[..end].to_string();
            self.pending.clear();
            return (out, true);
        }
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The text held back (generation ended without a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces() {
        let mut m = StopMatcher::new(&["END".into()], false);
        assert_eq!(m.push("hello E"), ("hello ".into(), false));
        assert_eq!(m.push("N"), ("".into(), false));
        assert_eq!(m.push("Dx"), ("".into(), true));
        let mut m = StopMatcher::new(&["END".into()], false);
        assert_eq!(m.push("hello E"), ("hello ".into(), false));
        assert_eq!(m.push("x"), ("Ex".into(), false));
        assert_eq!(m.flush(), "");
        let mut m = StopMatcher::new(&["\n\n".into(), "b".into()], true);
        assert_eq!(m.push("aab c"), ("aab".into(), true));
    }
}
