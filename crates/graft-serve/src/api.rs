//! Request parsing and validation: OpenAI request bodies (plus the vLLM extensions users rely
//! on) into typed requests ([`ChatRequest`], [`CompletionRequest`], …, each [`FromBody`]), with
//! every error naming the field at fault.

use crate::engine::Penalties;
use crate::error::ApiError;
use graft_model::sample::SamplingParams;
use serde_json::{Map, Value};

/// A JSON object body.
pub type Object = Map<String, Value>;

/// Parses a request body as a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<Object, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!("We could not parse the JSON body of your request: {e}"))
    })?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::bad_request("The request body must be a JSON object.")),
    }
}

/// The field's value, `None` when absent or `null`.
pub fn field<'a>(obj: &'a Object, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// An optional number in `[lo, hi]`.
pub fn opt_f32(obj: &Object, name: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number, got {v}")))?
        as f32;
    if !(x >= lo && x <= hi) {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x))
}

/// An optional integer in `[lo, hi]`.
pub fn opt_i64(obj: &Object, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let x = match v.as_i64() {
        Some(x) => x,
        None => match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => f as i64,
            _ => {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be an integer, got {v}"),
                ));
            }
        },
    };
    if x < lo || x > hi {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x))
}

/// An optional boolean.
pub fn opt_bool(obj: &Object, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be a boolean, got {v}"),
        )),
    }
}

/// An optional string.
pub fn opt_str<'a>(obj: &'a Object, name: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be a string, got {v}"),
        )),
    }
}

/// Generation parameters shared by chat and text completions.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// `max_completion_tokens` / `max_tokens` (`None`: up to the context).
    pub max_tokens: Option<usize>,
    /// Temperature, top-p, top-k, seed.
    pub sampling: SamplingParams,
    /// Whether `seed` was given (otherwise each request draws one).
    pub seed_given: bool,
    /// Choices per prompt.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Extra stop token ids (vLLM `stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// Penalties and logit bias.
    pub penalties: Penalties,
    /// Server-sent events instead of one JSON response.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens (vLLM `ignore_eos`).
    pub ignore_eos: bool,
    /// Drop special tokens from the text (vLLM `skip_special_tokens`, default true).
    pub skip_special_tokens: bool,
    /// Keep the matched stop string in the output (vLLM `include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
}

/// Parses the parameters common to both endpoints; `chat` selects chat's `logprobs` form
/// (boolean + `top_logprobs`) over the completions form (an integer).
pub fn parse_gen_params(obj: &Object, chat: bool) -> Result<GenParams, ApiError> {
    let temperature = opt_f32(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = opt_f32(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0).max(1e-9);
    let top_k = opt_i64(obj, "top_k", -1, i64::from(u32::MAX))?.unwrap_or(0);
    let seed = opt_i64(obj, "seed", i64::MIN, i64::MAX)?;
    let max_completion = opt_i64(obj, "max_completion_tokens", 1, 1 << 30)?;
    let max_tokens = match max_completion {
        Some(m) => Some(m),
        None => opt_i64(obj, "max_tokens", 1, 1 << 30)?,
    };
    let n = opt_i64(obj, "n", 1, 128)?.unwrap_or(1) as usize;
    let stop = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 16 {
                return Err(ApiError::invalid("stop", "`stop` may hold at most 16 strings"));
            }
            a.iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "`stop` must be a string or an array of strings")
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or an array of strings",
            ));
        }
    };
    let stop_token_ids = match field(obj, "stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u64::from(u32::MAX))
                    .map(|x| x as u32)
                    .ok_or_else(|| ApiError::invalid("stop_token_ids", "`stop_token_ids` must be token ids"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop_token_ids",
                "`stop_token_ids` must be an array of token ids",
            ));
        }
    };
    let mut logit_bias = Vec::new();
    if let Some(v) = field(obj, "logit_bias") {
        let m = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("logit_bias", "`logit_bias` must map token ids to numbers"))?;
        for (k, b) in m {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`logit_bias` key `{k}` is not a token id"))
            })?;
            let b = b
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid("logit_bias", "`logit_bias` values must be numbers in [-100, 100]")
                })?;
            logit_bias.push((id, b as f32));
        }
    }
    let penalties = Penalties {
        presence: opt_f32(obj, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency: opt_f32(obj, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        repetition: opt_f32(obj, "repetition_penalty", 1e-6, 100.0)?.unwrap_or(1.0),
        logit_bias,
    };
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| ApiError {
                param: Some("stream_options.include_usage".into()),
                ..e
            })?
            .unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    let logprobs = if chat {
        let on = opt_bool(obj, "logprobs")?.unwrap_or(false);
        let top = opt_i64(obj, "top_logprobs", 0, 20)?;
        if top.is_some() && !on {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true",
            ));
        }
        on.then(|| top.unwrap_or(0) as usize)
    } else {
        opt_i64(obj, "logprobs", 0, 20)?.map(|k| k as usize)
    };
    if let Some(rf) = field(obj, "response_format") {
        let t = rf.get("type").and_then(Value::as_str).unwrap_or("");
        if t != "text" {
            return Err(ApiError::invalid(
                "response_format",
                format!("`response_format` type `{t}` is not supported; only `text` is"),
            ));
        }
    }
    Ok(GenParams {
        max_tokens: max_tokens.map(|m| m as usize),
        sampling: SamplingParams {
            temperature,
            top_k: if top_k <= 0 { 0 } else { top_k as usize },
            top_p,
            seed: seed.map_or(0, |s| s as u64),
        },
        seed_given: seed.is_some(),
        n,
        stop,
        stop_token_ids,
        penalties,
        stream,
        include_usage,
        logprobs,
        ignore_eos: opt_bool(obj, "ignore_eos")?.unwrap_or(false),
        skip_special_tokens: opt_bool(obj, "skip_special_tokens")?.unwrap_or(true),
        include_stop_str_in_output: opt_bool(obj, "include_stop_str_in_output")?.unwrap_or(false),
    })
}

/// Message roles a chat request may use.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks one message's `role` and `content`: a known role, and content present unless the
/// message is an assistant turn that calls tools.
fn check_message(i: usize, m: &Value) -> Result<(), ApiError> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::invalid(
            format!("messages[{i}]"),
            format!("messages[{i}] must be an object with `role` and `content`"),
        ));
    };
    let param = format!("messages[{i}].role");
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                param.clone(),
                format!("{param} is required: one of {}", ROLES.join(", ")),
            ));
        }
        Some(v) => {
            return Err(ApiError::invalid(
                param.clone(),
                format!("{param} must be a string, one of {}; got {v}", ROLES.join(", ")),
            ));
        }
    };
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(
            param.clone(),
            format!(
                "{param} `{}` is not a valid role: use one of {}",
                role.escape_debug(),
                ROLES.join(", ")
            ),
        ));
    }
    let calls_tools = role == "assistant"
        && obj
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
    if field(obj, "content").is_none() && !calls_tools {
        let param = format!("messages[{i}].content");
        return Err(ApiError::invalid(
            param.clone(),
            format!(
                "{param} is required (a string or an array of text parts); only an assistant message with `tool_calls` may omit it"
            ),
        ));
    }
    Ok(())
}

/// Chat messages as the template sees them: every message has a known role and content
/// (null only for an assistant turn with `tool_calls`); content parts of type `text` are
/// joined into a string (other part types are refused).
pub fn parse_messages(obj: &Object) -> Result<Vec<graft_data::Message>, ApiError> {
    let Some(Value::Array(msgs)) = field(obj, "messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is required and must be an array of message objects",
        ));
    };
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        check_message(i, m)?;
        let param = format!("messages[{i}]");
        let mut msg = graft_data::Message::from_json(m)
            .map_err(|e| ApiError::invalid(param.clone(), format!("{param}: {e}")))?;
        match &msg.content {
            Value::String(_) | Value::Null => {}
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let kind = p.get("type").and_then(Value::as_str).unwrap_or("text");
                    match (kind, p.get("text").and_then(Value::as_str)) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!("content part type `{kind}` is not supported; only text parts are"),
                            ));
                        }
                    }
                }
                msg.content = Value::String(text);
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    "message content must be a string or an array of text parts (null only with `tool_calls`)",
                ));
            }
        }
        out.push(msg);
    }
    Ok(out)
}

/// A request body parsed from a JSON object.
pub trait FromBody: Sized {
    /// Parses and validates `obj`; errors name the field at fault.
    fn from_body(obj: &Object) -> Result<Self, ApiError>;
}

/// An optional string field, owned.
fn opt_string(obj: &Object, name: &str) -> Result<Option<String>, ApiError> {
    Ok(opt_str(obj, name)?.map(str::to_string))
}

/// A required string field.
fn req_string(obj: &Object, name: &str) -> Result<String, ApiError> {
    opt_string(obj, name)?.ok_or_else(|| ApiError::invalid(name, format!("`{name}` is required")))
}

/// What a chat request lets the model do with its `tools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides; tool calls in its reply are parsed (the default).
    Auto,
    /// No tool calls: the reply is plain content.
    None,
}

/// `tool_choice`: `"auto"` (default) or `"none"`. `"required"` and a named function are
/// refused rather than ignored: the server does not constrain decoding, so it cannot make the
/// model call a tool.
fn parse_tool_choice(obj: &Object) -> Result<ToolChoice, ApiError> {
    match field(obj, "tool_choice") {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(s)) if s == "auto" => Ok(ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Ok(ToolChoice::None),
        Some(v) => Err(ApiError::invalid(
            "tool_choice",
            format!(
                "`tool_choice` {v} is not supported: this server cannot force a tool call (it does not constrain decoding), so only \"auto\" (the default: tool calls in the reply are parsed) and \"none\" (the reply is plain content) are accepted"
            ),
        )),
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// `model` (`None`: the base model).
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<graft_data::Message>,
    /// Generation parameters.
    pub params: GenParams,
    /// `tools`, passed to the chat template.
    pub tools: Option<Vec<Value>>,
    /// `tool_choice`.
    pub tool_choice: ToolChoice,
    /// `chat_template_kwargs` (without `add_generation_prompt`).
    pub chat_template_kwargs: Object,
    /// Append the assistant header (vLLM `add_generation_prompt`, default true).
    pub add_generation_prompt: bool,
    /// Continue the last message instead of starting a new one (vLLM `continue_final_message`).
    pub continue_final_message: bool,
}

impl ChatRequest {
    /// Whether tool calls are parsed out of the reply: tools were given and `tool_choice` is
    /// not `"none"`.
    pub fn parses_tool_calls(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| !t.is_empty()) && self.tool_choice == ToolChoice::Auto
    }
}

impl FromBody for ChatRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        let model = opt_string(obj, "model")?;
        let messages = parse_messages(obj)?;
        let params = parse_gen_params(obj, true)?;
        let tools = match field(obj, "tools") {
            None => None,
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
        };
        let tool_choice = parse_tool_choice(obj)?;
        let mut chat_template_kwargs = match field(obj, "chat_template_kwargs") {
            None => Object::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    "chat_template_kwargs",
                    "`chat_template_kwargs` must be an object",
                ));
            }
        };
        chat_template_kwargs.remove("add_generation_prompt");
        let continue_final_message = opt_bool(obj, "continue_final_message")?.unwrap_or(false);
        let add_generation_prompt =
            opt_bool(obj, "add_generation_prompt")?.unwrap_or(!continue_final_message);
        Ok(ChatRequest {
            model,
            messages,
            params,
            tools,
            tool_choice,
            chat_template_kwargs,
            add_generation_prompt,
            continue_final_message,
        })
    }
}

/// The `prompt` of a text completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One or more strings, tokenized by the server.
    Texts(Vec<String>),
    /// One or more lists of token ids.
    Tokens(Vec<Vec<u32>>),
}

impl Prompt {
    /// Number of prompts.
    pub fn len(&self) -> usize {
        match self {
            Prompt::Texts(t) => t.len(),
            Prompt::Tokens(t) => t.len(),
        }
    }

    /// Whether there is no prompt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_prompt(obj: &Object) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
        )
    };
    let ids_of = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u64::from(u32::MAX))
                    .map(|x| x as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    match field(obj, "prompt") {
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Texts(vec![s.clone()])),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()
                .map(Prompt::Texts),
            Value::Number(_) => Ok(Prompt::Tokens(vec![ids_of(a)?])),
            Value::Array(_) => a
                .iter()
                .map(|v| v.as_array().ok_or_else(bad).and_then(|x| ids_of(x)))
                .collect::<Result<_, _>>()
                .map(Prompt::Tokens),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// `model` (`None`: the base model).
    pub model: Option<String>,
    /// The prompts; each gets `n` choices.
    pub prompt: Prompt,
    /// Generation parameters.
    pub params: GenParams,
    /// Put the prompt in front of each choice's text.
    pub echo: bool,
}

impl FromBody for CompletionRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        let model = opt_string(obj, "model")?;
        let prompt = parse_prompt(obj)?;
        let params = parse_gen_params(obj, false)?;
        if field(obj, "suffix").is_some_and(|s| s.as_str() != Some("")) {
            return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
        }
        if let Some(b) = opt_i64(obj, "best_of", 1, 128)?
            && b as usize != params.n
            && b != 1
        {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than `n` is not supported",
            ));
        }
        let echo = opt_bool(obj, "echo")?.unwrap_or(false);
        Ok(CompletionRequest {
            model,
            prompt,
            params,
            echo,
        })
    }
}

/// What vLLM's `/tokenize` tokenizes.
#[derive(Debug, Clone)]
pub enum TokenizeInput {
    /// `prompt`, with `add_special_tokens` (default true).
    Prompt {
        /// The text.
        text: String,
        /// Add BOS/EOS as the tokenizer does.
        add_special_tokens: bool,
    },
    /// Chat `messages`, rendered with the template.
    Messages {
        /// The conversation.
        messages: Vec<graft_data::Message>,
        /// Append the assistant header (default true).
        add_generation_prompt: bool,
    },
}

/// `POST /tokenize` (vLLM).
#[derive(Debug, Clone)]
pub struct TokenizeRequest {
    /// `model` (`None`: the base model).
    pub model: Option<String>,
    /// The text or conversation.
    pub input: TokenizeInput,
}

impl FromBody for TokenizeRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        let model = opt_string(obj, "model")?;
        let input = if field(obj, "messages").is_some() {
            TokenizeInput::Messages {
                messages: parse_messages(obj)?,
                add_generation_prompt: opt_bool(obj, "add_generation_prompt")?.unwrap_or(true),
            }
        } else {
            let text = opt_string(obj, "prompt")?
                .ok_or_else(|| ApiError::invalid("prompt", "`prompt` or `messages` is required"))?;
            TokenizeInput::Prompt {
                text,
                add_special_tokens: opt_bool(obj, "add_special_tokens")?.unwrap_or(true),
            }
        };
        Ok(TokenizeRequest { model, input })
    }
}

/// `POST /detokenize` (vLLM).
#[derive(Debug, Clone)]
pub struct DetokenizeRequest {
    /// `model` (`None`: the base model).
    pub model: Option<String>,
    /// Token ids (checked against the vocabulary by the server).
    pub tokens: Vec<u32>,
}

/// The error of a `tokens` field that is not a list of token ids.
pub fn bad_tokens() -> ApiError {
    ApiError::invalid("tokens", "`tokens` must be an array of token ids")
}

impl FromBody for DetokenizeRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        let model = opt_string(obj, "model")?;
        let tokens = field(obj, "tokens")
            .and_then(Value::as_array)
            .ok_or_else(bad_tokens)?
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u64::from(u32::MAX))
                    .map(|x| x as u32)
                    .ok_or_else(bad_tokens)
            })
            .collect::<Result<_, _>>()?;
        Ok(DetokenizeRequest { model, tokens })
    }
}

/// Loading an adapter: `POST /v1/adapters` (`name`, `path`) or vLLM's
/// `POST /v1/load_lora_adapter` (`lora_name`, `lora_path`, see [`LoadLoraAdapterRequest`]).
#[derive(Debug, Clone)]
pub struct LoadAdapterRequest {
    /// The name requests will use.
    pub name: String,
    /// The adapter directory (inside an adapter root).
    pub path: String,
    /// The body field holding the name (for errors).
    pub name_field: &'static str,
    /// The body field holding the path (for errors).
    pub path_field: &'static str,
}

impl LoadAdapterRequest {
    fn parse(obj: &Object, name_field: &'static str, path_field: &'static str) -> Result<Self, ApiError> {
        Ok(LoadAdapterRequest {
            name: req_string(obj, name_field)?,
            path: req_string(obj, path_field)?,
            name_field,
            path_field,
        })
    }
}

impl FromBody for LoadAdapterRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        LoadAdapterRequest::parse(obj, "name", "path")
    }
}

/// vLLM's `POST /v1/load_lora_adapter` body (`lora_name`, `lora_path`).
#[derive(Debug, Clone)]
pub struct LoadLoraAdapterRequest(pub LoadAdapterRequest);

impl FromBody for LoadLoraAdapterRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        LoadAdapterRequest::parse(obj, "lora_name", "lora_path").map(LoadLoraAdapterRequest)
    }
}

/// vLLM's `POST /v1/unload_lora_adapter` body (`lora_name`).
#[derive(Debug, Clone)]
pub struct UnloadLoraAdapterRequest {
    /// The adapter to unload.
    pub name: String,
}

impl FromBody for UnloadLoraAdapterRequest {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        Ok(UnloadLoraAdapterRequest {
            name: req_string(obj, "lora_name")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_gen_params(&obj(json!({"temperature": "hot"})), true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse_gen_params(&obj(json!({"max_tokens": 0})), true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse_gen_params(&obj(json!({"n": 1.5})), false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_gen_params(&obj(json!({"stop": [1]})), false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = parse_messages(&obj(json!({"messages": []}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse_messages(&obj(json!({"messages": [{"content": "x"}]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_messages(&obj(json!({"messages": ["x"]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0]"));
    }

    #[test]
    fn tool_choice_none_disables_tool_call_parsing() {
        let chat = |extra: Value| {
            let mut o = obj(json!({"messages": [{"role": "user", "content": "hi"}]}));
            o.extend(obj(extra));
            ChatRequest::from_body(&o)
        };
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(chat(json!({"tools": tools})).unwrap().parses_tool_calls());
        assert!(
            chat(json!({"tools": tools, "tool_choice": "auto"}))
                .unwrap()
                .parses_tool_calls()
        );
        assert!(
            !chat(json!({"tools": tools, "tool_choice": "none"}))
                .unwrap()
                .parses_tool_calls()
        );
        assert!(!chat(json!({"tool_choice": "auto"})).unwrap().parses_tool_calls());
        let e = chat(json!({"tools": tools, "tool_choice": "required"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn defaults_and_parts() {
        let p = parse_gen_params(&obj(json!({"max_completion_tokens": 5, "max_tokens": 9})), true).unwrap();
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.n, 1);
        let m = parse_messages(&obj(json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]})))
        .unwrap();
        assert_eq!(m[0].content, json!("ab"));
    }
}
