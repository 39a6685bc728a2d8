//! Text out of token ids while generating: the incremental decoder of `graft_data` (the same
//! algorithm as `graft generate`'s stream, so the server's text equals it) and stop-string
//! matching that holds back text which could still become a stop string.

pub use graft_data::IncrementalDecoder;

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
