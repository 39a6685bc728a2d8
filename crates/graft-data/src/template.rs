//! Chat templates rendered with Hugging Face `apply_chat_template` semantics, and the per-message
//! spans of the rendering that loss masks are derived from.
//!
//! The environment mirrors transformers: `trim_blocks`, `lstrip_blocks`, loop controls, Python
//! string/dict methods (minijinja-contrib pycompat), `raise_exception`, `strftime_now`, a `tojson`
//! with `json.dumps` semantics, `{% generation %}` blocks (rendered as plain content), and Python
//! `str()` output for `None`/booleans/lists/dicts.
//!
//! # How spans are found
//!
//! A template is a program: it may move the system prompt into the first user turn, put tool
//! definitions before the last user message, or drop reasoning from all but the last turn. Matching
//! role strings or template tags cannot be right for all of them. Instead [`ChatTemplate::render`]
//! asks the template itself: besides the full rendering `T` it renders every prefix of the
//! conversation, `P_i = render(messages[..i])`, and for each assistant message also the
//! generation prompt `G_i = render(messages[..i], add_generation_prompt=true)`.
//!
//! * Message `i` ends where `P_{i+1}` ends inside `T`.
//! * Assistant message `i` is *generated* from where `G_i` ends inside `T` to where it ends: this
//!   is exactly the text a model produces after the generation prompt at serving time, including
//!   its end-of-turn token, and excluding the role header.
//!
//! "Where `P` ends inside `T`" is `len(P)` when `P` is a prefix of `T` (true for most templates).
//! When it is not (the template renders the last turn differently), the longest common prefix of
//! `P` and `T` is extended by the longest tail of `P` that `T` continues with — the part of the
//! prefix rendering that is shared with the full one; when no tail continues, it backs up over
//! the punctuation both happened to share (`<|end|>\n<|` of `<|user|>` vs `<|endoftext|>`).
//! [`Rendered::prefix_stable`] says whether this fallback was needed.
//!
//! Cost: `2n + 1` renderings for `n` messages (templates render in microseconds).
//!
//! Known difference from Python jinja2: `str + (x|safe)` does not HTML-escape `str` (jinja2's
//! `Markup` does, which garbles e.g. Mistral's v3/v7 templates when tool-call arguments are objects),
//! `'%s' % x` string formatting is not supported (use `'%s'|format(x)`), and tuples print as lists.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::error::{Error, Result, read_text};
use crate::tokenizer::SpecialTokens;

/// One chat message as templates see it: `role`, `content` (a string, `null`, or a list of typed
/// parts) and any other fields (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, …).
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// Message content as given.
    pub content: Json,
    /// Other fields, passed to the template unchanged.
    pub extra: Map<String, Json>,
}

impl Message {
    /// A message with text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: Json::String(content.into()),
            extra: Map::new(),
        }
    }

    /// Parses an OpenAI-style message object.
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        let obj = v
            .as_object()
            .ok_or("expected a message object with \"role\" and \"content\"")?;
        let role = obj
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or("message has no string \"role\"")?
            .to_string();
        let content = obj.get("content").cloned().unwrap_or(Json::Null);
        let extra = obj
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "content")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Message { role, content, extra })
    }

    /// The message as a JSON object (role, content, then the other fields).
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert("role".into(), Json::String(self.role.clone()));
        m.insert("content".into(), self.content.clone());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Json::Object(m)
    }

    /// The text of the content: a string, or the concatenated text parts of a part list.
    pub fn text(&self) -> String {
        match &self.content {
            Json::String(s) => s.clone(),
            Json::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").or_else(|| p.get("value")).and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }
}

/// Where one message landed in a rendering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSpan {
    /// Index into the rendered messages.
    pub message_index: usize,
    /// The message's role.
    pub role: String,
    /// Bytes of the rendered text this message produced (its whole turn, headers included).
    pub byte_range: Range<usize>,
    /// For assistant messages: the bytes the model generates after the generation prompt (content
    /// and end-of-turn marker, no role header). These are the trained bytes.
    pub generated_range: Option<Range<usize>>,
}

/// A rendered conversation with per-message spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered text, byte-identical to `apply_chat_template(tokenize=False)`.
    pub text: String,
    /// One span per message, in order.
    pub spans: Vec<MessageSpan>,
    /// Whether every prefix rendering was a prefix of the full rendering (see the module docs).
    pub prefix_stable: bool,
}

/// A compiled chat template plus the special-token strings it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    env: Arc<Environment<'static>>,
    special: SpecialTokens,
    name: Option<String>,
    clock: Clock,
}

/// What `strftime_now` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Clock {
    /// The system clock (UTC).
    Now,
    /// A fixed UNIX time, formatted with the requested format.
    At(i64),
    /// A fixed string returned for every format.
    Text(String),
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("len", &self.source.len())
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a template source with the given special tokens.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self> {
        let mut t = ChatTemplate {
            source: Arc::from(source),
            env: Arc::new(Environment::new()),
            special,
            name: None,
            clock: Clock::Now,
        };
        t.rebuild()?;
        Ok(t)
    }

    fn rebuild(&mut self) -> Result<()> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&python_str(value))
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "write"))
        });
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", |v: Value| python_str(&v));
        env.add_filter("int", jinja_int);
        env.add_filter("float", jinja_float);
        env.add_filter("round", jinja_round);
        env.add_function(
            "raise_exception",
            |msg: Value| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISE_MARKER}{}", python_str(&msg)),
                ))
            },
        );
        let clock = self.clock.clone();
        env.add_function("strftime_now", move |fmt: String| -> String {
            match &clock {
                Clock::Text(s) => s.clone(),
                Clock::At(t) => strftime(&fmt, *t),
                Clock::Now => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    strftime(&fmt, now)
                }
            }
        });
        let source = rewrite_generation_tags(&self.source);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| Error::Template(describe(&e)))?;
        self.env = Arc::new(env);
        Ok(())
    }

    /// Pins `strftime_now` to a UNIX time (seconds, UTC) so renderings are reproducible.
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Result<Self> {
        self.clock = Clock::At(unix_seconds);
        self.rebuild()?;
        Ok(self)
    }

    /// Makes `strftime_now(any format)` return `text` (how transformers' tests pin the date).
    pub fn with_fixed_date_text(mut self, text: impl Into<String>) -> Result<Self> {
        self.clock = Clock::Text(text.into());
        self.rebuild()?;
        Ok(self)
    }

    /// Reads the template from a parsed `tokenizer_config.json` (or `chat_template.json`):
    /// `chat_template` is a string, or a list of `{name, template}` from which `name` (default
    /// `"default"`) is picked. Special tokens come from the same object.
    pub fn from_tokenizer_config(config: &Json, name: Option<&str>) -> Result<Self> {
        let special = special_tokens_from_config(config);
        let (source, picked) = pick_template(config.get("chat_template"), name)?;
        let mut t = Self::new(&source, special)?;
        t.name = picked;
        Ok(t)
    }

    /// Loads a `.jinja` file, or a `.json` file holding `chat_template`.
    pub fn from_file(path: &Path, special: SpecialTokens) -> Result<Self> {
        let text = read_text(path)?;
        let place = path.display().to_string();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Json = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(&place, format!("invalid JSON: {e}")))?;
            let (source, picked) = pick_template(v.get("chat_template"), None)
                .map_err(|e| Error::invalid(&place, e.to_string()))?;
            let mut t = Self::new(&source, special)?;
            t.name = picked;
            return Ok(t);
        }
        Self::new(&text, special).map_err(|e| Error::invalid(place, e.to_string()))
    }

    /// Finds the chat template of a model folder the way transformers does: `chat_template.jinja`,
    /// then `chat_template.json`, then `tokenizer_config.json`. `Ok(None)` when there is none.
    pub fn from_model_dir(dir: &Path, special: &SpecialTokens, name: Option<&str>) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return Self::from_file(&jinja, special.clone()).map(Some);
        }
        let json = dir.join("chat_template.json");
        if json.is_file() {
            return Self::from_file(&json, special.clone()).map(Some);
        }
        let cfg = dir.join("tokenizer_config.json");
        if cfg.is_file() {
            let text = read_text(&cfg)?;
            let place = cfg.display().to_string();
            let v: Json = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(&place, format!("invalid JSON: {e}")))?;
            if v.get("chat_template").is_some_and(|t| !t.is_null()) {
                let (source, picked) = pick_template(v.get("chat_template"), name)
                    .map_err(|e| Error::invalid(&place, e.to_string()))?;
                let mut t = Self::new(&source, special.clone())?;
                t.name = picked;
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// The template source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The picked template name when the config held several.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Special-token strings passed to the template.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders the whole conversation to text (what serving feeds the model).
    pub fn render_text(
        &self,
        messages: &[Message],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, Json>,
    ) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_serialize(m.to_json()))
            .collect();
        self.render_values(&msgs, tools, add_generation_prompt, extra_kwargs)
    }

    fn render_values(
        &self,
        msgs: &[Value],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, Json>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        // Like transformers' `special_tokens_map`: tokens the model lacks stay undefined.
        for (key, value) in [
            ("bos_token", &self.special.bos_token),
            ("eos_token", &self.special.eos_token),
            ("unk_token", &self.special.unk_token),
            ("pad_token", &self.special.pad_token),
        ] {
            if let Some(v) = value {
                ctx.insert(key.into(), Value::from(v.as_str()));
            }
        }
        if !self.special.additional.is_empty() {
            ctx.insert(
                "additional_special_tokens".into(),
                Value::from_serialize(&self.special.additional),
            );
        }
        ctx.insert(
            "tools".into(),
            tools.map(Value::from_serialize).unwrap_or(Value::from(())),
        );
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in extra_kwargs {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from(msgs.to_vec()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        tmpl.render(ctx).map_err(|e| {
            let d = describe(&e);
            match d.find(RAISE_MARKER) {
                Some(p) => {
                    let msg = &d[p + RAISE_MARKER.len()..];
                    let end = msg.find(" (in ").unwrap_or(msg.len());
                    Error::TemplateRaised(msg[..end].to_string())
                }
                None => Error::Template(d),
            }
        })
    }

    /// Renders the conversation and locates every message in the output (see the module docs).
    /// `extra_kwargs` are further template variables (`enable_thinking`, `documents`, …).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, Json>,
    ) -> Result<Rendered> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_serialize(m.to_json()))
            .collect();
        let text = self.render_values(&msgs, tools, add_generation_prompt, extra_kwargs)?;
        let n = msgs.len();
        let mut stable = true;
        let mut locate = |prefix: &str| {
            let (end, exact) = align_end(&text, prefix);
            stable &= exact;
            end
        };
        // boundaries[i] = where message i starts; boundaries[n] = where the last one ends.
        let mut boundaries = vec![0usize; n + 1];
        let start0 = self.render_values(&msgs[..0], tools, false, extra_kwargs).ok();
        boundaries[0] = start0.map(|p| locate(&p)).unwrap_or(0);
        let mut generated = vec![None; n];
        for i in 0..n {
            let is_assistant = messages[i].role == "assistant";
            if is_assistant {
                let g = self
                    .render_values(&msgs[..i], tools, true, extra_kwargs)
                    .map_err(|e| {
                        Error::Template(format!(
                            "cannot locate assistant message {i}: rendering its generation prompt failed: {e}"
                        ))
                    })?;
                generated[i] = Some(locate(&g));
            }
            let end = if i + 1 == n && !add_generation_prompt {
                text.len()
            } else {
                match self.render_values(&msgs[..=i], tools, false, extra_kwargs) {
                    Ok(p) => locate(&p),
                    Err(e) if is_assistant => {
                        return Err(Error::Template(format!(
                            "cannot locate assistant message {i}: rendering messages up to it failed: {e}"
                        )));
                    }
                    Err(_) => boundaries[i],
                }
            };
            boundaries[i + 1] = end.max(boundaries[i]);
        }
        let spans = (0..n)
            .map(|i| {
                let byte_range = boundaries[i]..boundaries[i + 1];
                let generated_range = generated[i].map(|g| {
                    let g = g.clamp(byte_range.start, byte_range.end);
                    g..byte_range.end
                });
                MessageSpan {
                    message_index: i,
                    role: messages[i].role.clone(),
                    byte_range,
                    generated_range,
                }
            })
            .collect();
        Ok(Rendered {
            text,
            spans,
            prefix_stable: stable,
        })
    }
}

/// Where the rendering `prefix` of a conversation prefix ends inside the full rendering `text`,
/// and whether it was an exact prefix.
fn align_end(text: &str, prefix: &str) -> (usize, bool) {
    if text.starts_with(prefix) {
        return (prefix.len(), true);
    }
    let lcp = common_prefix_len(text, prefix);
    let rest = &prefix[lcp..];
    let continuation = &text[lcp..];
    for (k, _) in rest.char_indices() {
        let tail = &rest[k..];
        if continuation.starts_with(tail) {
            return (lcp + tail.len(), false);
        }
    }
    // Nothing of the prefix rendering continues: it diverged inside a marker both happen to start
    // alike (`<|end|>\n<|user|>` vs `<|end|>\n<|endoftext|>`); back up to the marker's start.
    let backed = text[..lcp].trim_end_matches(|c: char| c.is_ascii_punctuation());
    (backed.len(), false)
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

const RAISE_MARKER: &str = "raise_exception: ";

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Picks the template string from a `chat_template` config value.
fn pick_template(value: Option<&Json>, name: Option<&str>) -> Result<(String, Option<String>)> {
    match value {
        Some(Json::String(s)) => Ok((s.clone(), None)),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let n = entry.get("name").and_then(|v| v.as_str());
                let t = entry.get("template").and_then(|v| v.as_str());
                match (n, t) {
                    (Some(n), Some(t)) => {
                        if n == name.unwrap_or("default") {
                            return Ok((t.to_string(), Some(n.to_string())));
                        }
                        names.push(n.to_string());
                    }
                    _ => {
                        return Err(Error::invalid(
                            "chat_template",
                            "expected a list of {\"name\": …, \"template\": …} objects",
                        ));
                    }
                }
            }
            Err(Error::invalid(
                "chat_template",
                format!(
                    "no template named {:?}; available: {}",
                    name.unwrap_or("default"),
                    names.join(", ")
                ),
            ))
        }
        Some(Json::Null) | None => Err(Error::invalid(
            "chat_template",
            "missing: the model has no chat template",
        )),
        Some(_) => Err(Error::invalid(
            "chat_template",
            "expected a string or a list of named templates",
        )),
    }
}

/// Special-token strings from a tokenizer config object.
pub fn special_tokens_from_config(config: &Json) -> SpecialTokens {
    let get = |k: &str| match config.get(k) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Object(m)) => m.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    };
    SpecialTokens {
        bos_token: get("bos_token"),
        eos_token: get("eos_token"),
        unk_token: get("unk_token"),
        pad_token: get("pad_token"),
        additional: config
            .get("additional_special_tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
    }
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask markers) with
/// an always-true `if` block, which keeps the same whitespace-control behaviour.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(p) = rest.find("{%") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 2..];
        let Some(close) = after.find("%}") else {
            out.push_str(&rest[p..]);
            return out;
        };
        let inner = &after[..close];
        let (lmod, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, rmod) = match body.trim_end().chars().last() {
            Some(c @ ('-' | '+')) => {
                let t = body.trim_end();
                (&t[..t.len() - 1], c.to_string())
            }
            _ => (body, String::new()),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lmod} {r} {rmod}%}}")),
            None => {
                out.push_str("{%");
                out.push_str(inner);
                out.push_str("%}");
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Jinja2's `int` filter: numbers truncate, strings parse (also via float), anything else gives
/// `default` (0) instead of failing.
fn jinja_int(v: Value, default: Option<Value>) -> Value {
    let fallback = || default.clone().unwrap_or(Value::from(0));
    match v.kind() {
        ValueKind::Number if v.is_integer() => v,
        ValueKind::Number => f64::try_from(v)
            .map(|f| Value::from(f.trunc() as i64))
            .unwrap_or_else(|_| fallback()),
        ValueKind::Bool => Value::from(v.is_true() as i64),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default().trim().replace('_', "");
            match s.parse::<i64>() {
                Ok(i) => Value::from(i),
                Err(_) => match s.parse::<f64>() {
                    Ok(f) if f.is_finite() => Value::from(f.trunc() as i64),
                    _ => fallback(),
                },
            }
        }
        _ => fallback(),
    }
}

/// Jinja2's `round(value, precision=0, method='common')`: `common` is Python's `round` (ties to
/// even), `ceil`/`floor` round up/down; the result is a float.
fn jinja_round(
    v: Value,
    precision: Option<i32>,
    method: Option<String>,
) -> std::result::Result<Value, minijinja::Error> {
    let x = f64::try_from(v)?;
    let p = precision.unwrap_or(0);
    let scale = 10f64.powi(p);
    let scaled = x * scale;
    let r = match method.as_deref().unwrap_or("common") {
        "common" => scaled.round_ties_even(),
        "ceil" => scaled.ceil(),
        "floor" => scaled.floor(),
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("round: method must be 'common', 'ceil' or 'floor', got {other:?}"),
            ));
        }
    };
    Ok(Value::from(r / scale))
}

/// Jinja2's `float` filter: `default` (0.0) when the value does not parse.
fn jinja_float(v: Value, default: Option<Value>) -> Value {
    let fallback = || default.clone().unwrap_or(Value::from(0.0));
    match v.kind() {
        ValueKind::Number => f64::try_from(v).map(Value::from).unwrap_or_else(|_| fallback()),
        ValueKind::Bool => Value::from(if v.is_true() { 1.0 } else { 0.0 }),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default().trim().to_ascii_lowercase();
            let parsed = match s.as_str() {
                "inf" | "+inf" | "infinity" => Some(f64::INFINITY),
                "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
                "nan" => Some(f64::NAN),
                _ => s.replace('_', "").parse::<f64>().ok(),
            };
            parsed.map(Value::from).unwrap_or_else(fallback)
        }
        _ => fallback(),
    }
}

/// Python `str()` of a template value (`None`, `True`, `['a', 1]`, `{'k': 'v'}`).
fn python_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => python_repr(v),
    }
}

fn python_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => number_repr(v),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::with_capacity(s.len() + 2);
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        out.push_str(&format!("\\x{:02x}", c as u32))
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        ValueKind::Map => {
            let items: Vec<String> = v
                .try_iter()
                .map(|it| {
                    it.map(|k| {
                        let val = v.get_item(&k).unwrap_or(Value::from(()));
                        format!("{}: {}", python_repr(&k), python_repr(&val))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = v
                .try_iter()
                .map(|it| it.map(|x| python_repr(&x)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        _ => v.to_string(),
    }
}

fn number_repr(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(f) => python_float(f),
        Err(_) => v.to_string(),
    }
}

/// Python `repr(float)`: shortest round-trip digits, exponent form outside `1e-4 <= |x| < 1e16`.
pub(crate) fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let exp = f.abs().log10().floor() as i32;
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let s = format!("{f:e}");
        let (mant, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", e.abs())
    }
}

/// `json.dumps` of a template value with transformers' settings (`ensure_ascii=False`).
fn tojson_filter(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent = match indent {
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        _ => None,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(seps) => {
            let a = seps
                .get_item(&Value::from(0))
                .ok()
                .and_then(|v| v.as_str().map(str::to_string));
            let b = seps
                .get_item(&Value::from(1))
                .ok()
                .and_then(|v| v.as_str().map(str::to_string));
            (a.unwrap_or(", ".into()), b.unwrap_or(": ".into()))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    write_json(&mut out, &value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    out: &mut String,
    v: &Value,
    o: &JsonOpts,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, d: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..d {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_repr(v)),
        ValueKind::String => write_json_string(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
                    _ => k.to_string(),
                };
                write_json_string(out, &key, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, x, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_string(out, &v.to_string(), o.ensure_ascii),
    }
    Ok(())
}

/// Formats a UNIX time (UTC) with C `strftime` directives (`%d %B %Y`, `%Y-%m-%d`, …).
pub fn strftime(fmt: &str, unix_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86400);
    let secs = unix_seconds.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('u') => out.push_str(&(weekday + 1).to_string()),
            Some('w') => out.push_str(&((weekday + 1) % 7).to_string()),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        ChatTemplate::new(
            src,
            SpecialTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn conv() -> Vec<Message> {
        vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ]
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t =
            tmpl(r#"{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ "é<>&'" | tojson }}|{{ 1.5 | tojson }}"#);
        let mut kw = Map::new();
        kw.insert(
            "x".into(),
            serde_json::json!({"b": [1, 2.0, null, true], "a": {}}),
        );
        let out = t.render_text(&[], None, false, &kw).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.0, null, true], \"a\": {}}|{\n  \"b\": [\n    1,\n    2.0,\n    null,\n    true\n  ],\n  \"a\": {}\n}|\"é<>&'\"|1.5"
        );
    }

    #[test]
    fn python_str_of_values() {
        let t = tmpl(r#"{{ none }}|{{ true }}|{{ [1, 'a', none] }}|{{ {'k': "it's"} }}|{{ 3 | string }}"#);
        assert_eq!(
            t.render_text(&[], None, false, &Map::new()).unwrap(),
            "None|True|[1, 'a', None]|{'k': \"it's\"}|3"
        );
    }

    #[test]
    fn raise_exception_is_reported() {
        let t =
            tmpl("{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}");
        match t.render_text(&conv(), None, false, &Map::new()) {
            Err(Error::TemplateRaised(m)) => assert_eq!(m, "System first!"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generation_tags_and_strftime() {
        let t = tmpl("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}\n{% endfor %}{{ strftime_now('%d %b %Y') }}")
            .with_fixed_time(1721952000)
            .unwrap();
        assert_eq!(
            t.render_text(&conv(), None, false, &Map::new()).unwrap(),
            "[Hi]Hello![Bye]26 Jul 2024"
        );
        assert_eq!(
            rewrite_generation_tags("{%- generation -%}x{%- endgeneration %}"),
            "{%- if true -%}x{%- endif %}"
        );
        assert_eq!(
            strftime("%A %Y-%m-%d %H:%M:%S %j", 951782400 + 3661),
            "Tuesday 2000-02-29 01:01:01 060"
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let t = tmpl(
            "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m.content.strip().upper() }}{{ ','.join(['a','b']) if loop.first }}{% endfor %}",
        );
        assert_eq!(
            t.render_text(&conv(), None, false, &Map::new()).unwrap(),
            "HIa,bBYE"
        );
    }

    #[test]
    fn spans_of_a_prefix_stable_template() {
        let t = tmpl(
            "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        );
        let r = t.render(&conv(), None, false, &Map::new()).unwrap();
        assert!(r.prefix_stable);
        assert_eq!(
            r.text,
            "<s><|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n"
        );
        let a = &r.spans[1];
        assert_eq!(&r.text[a.byte_range.clone()], "<|assistant|>\nHello!</s>\n");
        assert_eq!(&r.text[a.generated_range.clone().unwrap()], "Hello!</s>\n");
        assert_eq!(&r.text[r.spans[0].byte_range.clone()], "<|user|>\nHi</s>\n");
        assert!(r.spans[0].generated_range.is_none());
    }

    #[test]
    fn spans_when_last_turn_renders_differently() {
        // Like Qwen3: only the final assistant turn gets a reasoning block.
        let t = tmpl(
            "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        );
        let r = t.render(&conv(), None, false, &Map::new()).unwrap();
        assert!(!r.prefix_stable);
        assert_eq!(
            &r.text[r.spans[1].generated_range.clone().unwrap()],
            "Hello!<end>"
        );
        assert_eq!(&r.text[r.spans[2].byte_range.clone()], "<user>Bye<end>");
    }

    #[test]
    fn picks_named_templates() {
        let cfg = serde_json::json!({"eos_token": "E", "chat_template": [
            {"name": "default", "template": "D{{ eos_token }}"}, {"name": "tool_use", "template": "T"}]});
        let d = ChatTemplate::from_tokenizer_config(&cfg, None).unwrap();
        assert_eq!(d.render_text(&[], None, false, &Map::new()).unwrap(), "DE");
        let t = ChatTemplate::from_tokenizer_config(&cfg, Some("tool_use")).unwrap();
        assert_eq!(t.name(), Some("tool_use"));
        let err = ChatTemplate::from_tokenizer_config(&cfg, Some("nope")).unwrap_err();
        assert!(err.to_string().contains("available: default, tool_use"), "{err}");
    }

    #[test]
    fn int_and_float_filters_default_like_jinja2() {
        let t = tmpl(
            "{{ '22'|int }}|{{ 'x'|int }}|{{ '2.5'|int }}|{{ 'x'|float }}|{{ '2.5'|float }}|{{ 'x'|int(7) }}",
        );
        assert_eq!(
            t.render_text(&[], None, false, &Map::new()).unwrap(),
            "22|0|2|0.0|2.5|7"
        );
        let t = tmpl("{{ 2.5|round }}|{{ 3.5|round }}|{{ 2.25|round(1) }}|{{ 2.1|round(0, 'ceil') }}");
        assert_eq!(
            t.render_text(&[], None, false, &Map::new()).unwrap(),
            "2.0|4.0|2.2|3.0"
        );
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
    }
}
