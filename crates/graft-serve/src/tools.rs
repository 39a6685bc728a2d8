//! Tool calls in generated text, Hermes style (`<tool_call>{"name": …, "arguments": …}</tool_call>`,
//! as Qwen2.5 and Hermes templates ask for): [`ToolCallFilter`] holds a call back from the
//! streamed content, [`parse_tool_calls`] turns it into OpenAI `tool_calls` objects.

use serde_json::{Value, json};

/// Opens a tool call in the generated text.
pub const TOOL_OPEN: &str = "<tool_call>";
/// Closes a tool call.
pub const TOOL_CLOSE: &str = "</tool_call>";

/// Splits one choice's growing text into content that may be sent now and a tool-call block
/// that is held back until the choice ends.
#[derive(Debug, Clone, Default)]
pub struct ToolCallFilter {
    /// Bytes of the text already released as content.
    emitted: usize,
    /// Where a `<tool_call>` block starts in the text.
    start: Option<usize>,
}

impl ToolCallFilter {
    /// A filter that has released nothing yet.
    pub fn new() -> ToolCallFilter {
        ToolCallFilter::default()
    }

    /// Content of `text` (the whole text so far) that can be sent now: text before a
    /// `<tool_call>` block, holding back a possible start of one (all of it `at_end`).
    pub fn release(&mut self, text: &str, at_end: bool) -> String {
        if self.start.is_some() {
            return String::new();
        }
        let upto = if let Some(p) = text[self.emitted..].find(TOOL_OPEN) {
            self.start = Some(self.emitted + p);
            self.emitted + p
        } else if at_end {
            text.len()
        } else {
            let hold = (1..TOOL_OPEN.len())
                .rev()
                .find(|&k| text.ends_with(&TOOL_OPEN[..k]))
                .unwrap_or(0);
            (text.len() - hold).max(self.emitted)
        };
        let out = text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }

    /// Where the held-back tool-call block starts, if one was seen.
    pub fn start(&self) -> Option<usize> {
        self.start
    }

    /// The block was not a well-formed call: releases it as content; returns it.
    pub fn release_block(&mut self, text: &str) -> String {
        let from = self.start.take().unwrap_or(self.emitted);
        self.emitted = text.len();
        text[from..].to_string()
    }
}

/// Parses Hermes-style `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks into OpenAI
/// `tool_calls` objects with ids `call_{id_base}_{i}`; empty unless every block is well formed.
pub fn parse_tool_calls(text: &str, id_base: &str) -> Vec<Value> {
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(p) = rest.find(TOOL_OPEN) {
        let body = &rest[p + TOOL_OPEN.len()..];
        let (json_text, next) = match body.find(TOOL_CLOSE) {
            Some(e) => (&body[..e], &body[e + TOOL_CLOSE.len()..]),
            None => (body, ""),
        };
        let Ok(v) = serde_json::from_str::<Value>(json_text.trim()) else {
            return Vec::new();
        };
        let Some(name) = v.get("name").and_then(Value::as_str) else {
            return Vec::new();
        };
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            Some(Value::String(s)) => s.clone(),
            Some(a) => a.to_string(),
            None => "{}".into(),
        };
        calls.push(json!({
            "id": format!("call_{id_base}_{}", calls.len()),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
        rest = next;
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_held_back_and_parsed() {
        let mut f = ToolCallFilter::new();
        let mut text = String::new();
        let mut sent = String::new();
        for piece in [
            "Let me check. <tool",
            "_call>{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}</tool_call>",
        ] {
            text.push_str(piece);
            sent.push_str(&f.release(&text, false));
        }
        sent.push_str(&f.release(&text, true));
        assert_eq!(sent, "Let me check. ");
        let p = f.start().unwrap();
        let calls = parse_tool_calls(&text[p..], "x");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(parse_tool_calls("<tool_call>not json</tool_call>", "x").is_empty());

        let mut f = ToolCallFilter::new();
        assert_eq!(f.release("plain <tool", false), "plain ");
        assert_eq!(f.release("plain <tool", true), "<tool");
    }

    #[test]
    fn a_malformed_block_is_released_as_content() {
        let mut f = ToolCallFilter::new();
        let text = "a <tool_call>oops";
        assert_eq!(f.release(text, true), "a ");
        assert_eq!(f.release_block(text), "<tool_call>oops");
        assert_eq!(f.start(), None);
        assert_eq!(f.release(text, true), "");
    }
}
