//! The HTTP layer: axum handlers that parse and validate requests, hand sequences to the
//! [`Engine`], and shape what comes back into OpenAI responses (JSON or server-sent events).

use crate::api::{self, GenParams, Object};
use crate::engine::{Engine, SeqEvent, SeqRequest, SubmitError, TokenLogprobs};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{AdapterEntry, Registry, RegistryError};
use crate::text::{IncrementalDecoder, StopMatcher};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use graft_data::{ChatTemplate, Tokenizer};
use graft_model::infer::FinishReason;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

/// Everything the handlers share.
pub struct AppState {
    /// The scheduler.
    pub engine: Engine,
    /// Loaded adapters.
    pub registry: Arc<Registry>,
    /// The base model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template (`None`: chat completions are refused).
    pub template: Option<ChatTemplate>,
    /// The name requests use for the base model.
    pub base_name: String,
    /// Other names accepted for the base model (e.g. the `--model` path).
    pub base_aliases: Vec<String>,
    /// Accepted API keys (empty: no authentication).
    pub api_keys: Vec<String>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
    /// Vocabulary size of the model.
    pub vocab: usize,
    /// Unix seconds the server started.
    pub created: u64,
    /// Request id counter.
    pub next_id: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter).get(list_adapters))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/v1/load_lora_adapter", post(load_lora_adapter_vllm))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter_vllm))
        .fallback(fallback)
        .with_state(state)
}

async fn fallback() -> Response {
    ApiError::not_found("Unknown route.").into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION"), "server": "graft"})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.metrics
        .adapters_loaded
        .store(st.registry.len() as u64, Ordering::Relaxed);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(),
    )
        .into_response()
}

/// Turns a handler result into a response, counting failures.
fn finish(st: &AppState, r: Result<Response, ApiError>) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            st.metrics.failed_requests.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

fn check_auth(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if st.api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match given {
        None => Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        )),
        Some(k) if st.api_keys.iter().any(|a| a == k) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

fn model_object(st: &AppState, id: &str, adapter: Option<&AdapterEntry>) -> Value {
    match adapter {
        None => json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "graft",
            "root": id,
            "parent": null,
            "max_model_len": st.engine.config().max_context,
        }),
        Some(a) => json!({
            "id": a.name,
            "object": "model",
            "created": a.created,
            "owned_by": "graft",
            "root": a.path.display().to_string(),
            "parent": st.base_name,
            "max_model_len": st.engine.config().max_context,
            "lora_rank": a.config.r,
        }),
    }
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = check_auth(&st, &headers).map(|()| {
        let mut data = vec![model_object(&st, &st.base_name, None)];
        data.extend(
            st.registry
                .list()
                .iter()
                .map(|a| model_object(&st, &a.name, Some(a))),
        );
        axum::Json(json!({"object": "list", "data": data})).into_response()
    });
    finish(&st, r)
}

async fn get_model(State(st): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = check_auth(&st, &headers).and_then(|()| {
        let (name, adapter) = resolve_model(&st, Some(&id))?;
        Ok(axum::Json(model_object(&st, &name, adapter.as_deref())).into_response())
    });
    finish(&st, r)
}

fn resolve_model(st: &AppState, name: Option<&str>) -> Result<(String, Option<Arc<AdapterEntry>>), ApiError> {
    let Some(name) = name else {
        return Ok((st.base_name.clone(), None));
    };
    if name == st.base_name || st.base_aliases.iter().any(|a| a == name) {
        return Ok((name.to_string(), None));
    }
    match st.registry.get(name) {
        Some(a) => Ok((name.to_string(), Some(a))),
        None => Err(ApiError::model_not_found(name)),
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters

fn registry_error(e: RegistryError, name_param: &str, path_param: &str) -> ApiError {
    let msg = e.to_string();
    match e {
        RegistryError::InvalidName(_) => ApiError::invalid(name_param, msg),
        RegistryError::Forbidden(_) => ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: Some("path_not_allowed"),
            ..ApiError::invalid(path_param, msg)
        },
        RegistryError::Exists(_) => ApiError::invalid(name_param, msg)
            .with_status(StatusCode::CONFLICT)
            .with_code("adapter_exists"),
        RegistryError::NotFound(_) => ApiError::invalid(name_param, msg)
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"),
        RegistryError::Load(_) => ApiError::invalid(path_param, msg),
    }
}

async fn do_load(
    st: Arc<AppState>,
    body: Bytes,
    name_field: &'static str,
    path_field: &'static str,
) -> Result<Response, ApiError> {
    let obj = api::parse_body(&body)?;
    let name = api::opt_str(&obj, name_field)?
        .ok_or_else(|| ApiError::invalid(name_field, format!("`{name_field}` is required")))?
        .to_string();
    let path = api::opt_str(&obj, path_field)?
        .ok_or_else(|| ApiError::invalid(path_field, format!("`{path_field}` is required")))?
        .to_string();
    let reg = st.registry.clone();
    let (n2, p2) = (name.clone(), path.clone());
    let entry = tokio::task::spawn_blocking(move || reg.load(&n2, &p2))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))?
        .map_err(|e| registry_error(e, name_field, path_field))?;
    st.metrics
        .adapters_loaded
        .store(st.registry.len() as u64, Ordering::Relaxed);
    let mut obj = model_object(&st, &entry.name, Some(&entry));
    obj["path"] = json!(entry.path.display().to_string());
    Ok((StatusCode::OK, axum::Json(obj)).into_response())
}

async fn load_adapter(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = match check_auth(&st, &headers) {
        Ok(()) => do_load(st.clone(), body, "name", "path").await,
        Err(e) => Err(e),
    };
    finish(&st, r)
}

async fn load_lora_adapter_vllm(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = match check_auth(&st, &headers) {
        Ok(()) => do_load(st.clone(), body, "lora_name", "lora_path").await,
        Err(e) => Err(e),
    };
    finish(&st, r)
}

async fn list_adapters(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = check_auth(&st, &headers).map(|()| {
        let data: Vec<Value> = st
            .registry
            .list()
            .iter()
            .map(|a| {
                let mut o = model_object(&st, &a.name, Some(a));
                o["path"] = json!(a.path.display().to_string());
                o
            })
            .collect();
        axum::Json(json!({"object": "list", "data": data})).into_response()
    });
    finish(&st, r)
}

fn do_unload(st: &AppState, name: &str, param: &str) -> Result<Response, ApiError> {
    st.registry
        .remove(name)
        .map_err(|e| registry_error(e, param, "path"))?;
    st.metrics
        .adapters_loaded
        .store(st.registry.len() as u64, Ordering::Relaxed);
    Ok(axum::Json(json!({"id": name, "object": "model", "deleted": true})).into_response())
}

async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let r = check_auth(&st, &headers).and_then(|()| do_unload(&st, &name, "name"));
    finish(&st, r)
}

async fn unload_lora_adapter_vllm(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = check_auth(&st, &headers).and_then(|()| {
        let obj = api::parse_body(&body)?;
        let name = api::opt_str(&obj, "lora_name")?
            .ok_or_else(|| ApiError::invalid("lora_name", "`lora_name` is required"))?;
        do_unload(&st, name, "lora_name")
    });
    finish(&st, r)
}

// ---------------------------------------------------------------------------------------------
// Generation

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Per-choice decoding state.
struct Choice {
    prompt: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    text: String,
    tokens: usize,
    finish: Option<&'static str>,
    cancel: Arc<AtomicBool>,
    logprobs: Vec<(u32, TokenLogprobs)>,
    started: bool,
    /// Bytes of `text` already sent as content (tool-call requests hold text back).
    emitted: usize,
    /// Where a `<tool_call>` block starts in `text`.
    tool_start: Option<usize>,
    /// Parsed tool calls (OpenAI `tool_calls` objects).
    tool_calls: Vec<Value>,
}

const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

impl Choice {
    /// Content that can be sent now when the reply may contain tool calls: text before a
    /// `<tool_call>` block, holding back a possible start of one (all of it `at_end`).
    fn tool_filtered(&mut self, at_end: bool) -> String {
        if self.tool_start.is_some() {
            return String::new();
        }
        let t = &self.text;
        let upto = if let Some(p) = t[self.emitted..].find(TOOL_OPEN) {
            self.tool_start = Some(self.emitted + p);
            self.emitted + p
        } else if at_end {
            t.len()
        } else {
            let hold = (1..TOOL_OPEN.len())
                .rev()
                .find(|&k| t.ends_with(&TOOL_OPEN[..k]))
                .unwrap_or(0);
            (t.len() - hold).max(self.emitted)
        };
        let out = t[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }
}

/// Parses Hermes-style `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks.
fn parse_tool_calls(text: &str, id_base: &str) -> Vec<Value> {
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

/// What one engine event means for the response.
enum Out {
    Delta {
        index: usize,
        text: String,
        logprobs: Vec<(u32, TokenLogprobs)>,
    },
    Finish {
        index: usize,
        reason: &'static str,
    },
    ToolCalls {
        index: usize,
        calls: Vec<Value>,
    },
    Error(String),
}

/// A submitted request: its choices and the engine's event stream.
struct Job {
    st: Arc<AppState>,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    params: GenParams,
    prompt_tokens: usize,
    choices: Vec<Choice>,
    rx: UnboundedReceiver<SeqEvent>,
    echo: Vec<String>,
    /// Parse Hermes-style tool calls out of the replies (chat with `tools`).
    tools: bool,
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn submit(
    st: &Arc<AppState>,
    kind: Kind,
    model: String,
    adapter: Option<Arc<AdapterEntry>>,
    prompts: Vec<Vec<u32>>,
    params: GenParams,
    echo: Vec<String>,
) -> Result<Job, ApiError> {
    let max_context = st.engine.config().max_context;
    let param = if kind == Kind::Chat { "messages" } else { "prompt" };
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::invalid(param, "the prompt encodes to no tokens"));
        }
        if p.len() >= max_context {
            return Err(ApiError::invalid(
                param,
                format!(
                    "This model's maximum context length is {max_context} tokens. However, your prompt has {} tokens; leave room for at least one completion token.",
                    p.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= st.vocab) {
            return Err(ApiError::invalid(
                param,
                format!("token id {bad} is outside the vocabulary ({})", st.vocab),
            ));
        }
    }
    let mut stop_tokens = params.stop_token_ids.clone();
    if !params.ignore_eos {
        stop_tokens.extend(&st.eos);
    }
    let n_id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let created = now_secs();
    let base_seed = if params.seed_given {
        params.sampling.seed
    } else {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ n_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let arrived = Instant::now();
    let mut seqs = Vec::new();
    let mut choices = Vec::new();
    for (pi, p) in prompts.iter().enumerate() {
        for j in 0..params.n {
            let index = pi * params.n + j;
            let cancel = Arc::new(AtomicBool::new(false));
            let mut decoder = IncrementalDecoder::new(params.skip_special_tokens);
            // Prime with the prompt so the first generated token decodes as it does after it.
            for &id in p.iter() {
                decoder.step(&st.tokenizer, id);
            }
            let mut sampling = params.sampling;
            sampling.seed = base_seed.wrapping_add(index as u64);
            let room = max_context - p.len();
            seqs.push(SeqRequest {
                index,
                prompt: p.clone(),
                adapter: adapter.clone(),
                sampling,
                penalties: params.penalties.clone(),
                max_tokens: params.max_tokens.unwrap_or(room).min(room),
                stop_tokens: stop_tokens.clone(),
                logprobs: params.logprobs,
                cancel: cancel.clone(),
                events: tx.clone(),
                arrived,
            });
            choices.push(Choice {
                prompt: pi,
                decoder,
                stop: StopMatcher::new(&params.stop, params.include_stop_str_in_output),
                text: String::new(),
                tokens: 0,
                finish: None,
                cancel,
                logprobs: Vec::new(),
                started: false,
                emitted: 0,
                tool_start: None,
                tool_calls: Vec::new(),
            });
        }
    }
    match st.engine.submit(seqs) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => {
            return Err(ApiError::queue_full(st.engine.config().max_queue));
        }
        Err(SubmitError::Stopped) => return Err(ApiError::internal("the engine has stopped")),
    }
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    Ok(Job {
        st: st.clone(),
        kind,
        id: format!("{prefix}-{created:x}{n_id:08x}"),
        model,
        created,
        params,
        prompt_tokens,
        choices,
        rx,
        echo,
        tools: false,
    })
}

impl Job {
    fn all_done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).sum()
    }

    fn usage(&self) -> Value {
        let c = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c,
            "total_tokens": self.prompt_tokens + c,
        })
    }

    /// Applies one engine event to its choice.
    fn on_event(&mut self, ev: SeqEvent) -> Vec<Out> {
        let tok = &self.st.tokenizer;
        let mut out = Vec::new();
        match ev {
            SeqEvent::Token { index, id, logprobs } => {
                let Some(c) = self.choices.get_mut(index) else {
                    return out;
                };
                if c.finish.is_some() {
                    return out;
                }
                c.tokens += 1;
                let lps: Vec<(u32, TokenLogprobs)> = logprobs.map(|l| vec![(id, l)]).unwrap_or_default();
                let piece = c.decoder.step(tok, id).unwrap_or_default();
                let (mut text, stopped) = c.stop.push(&piece);
                c.text.push_str(&text);
                if self.tools {
                    text = c.tool_filtered(false);
                }
                c.logprobs.extend(lps.iter().cloned());
                if !text.is_empty() || !lps.is_empty() {
                    out.push(Out::Delta {
                        index,
                        text,
                        logprobs: lps,
                    });
                }
                if stopped {
                    c.cancel.store(true, Ordering::Relaxed);
                    out.extend(self.end_choice(index, "stop"));
                }
            }
            SeqEvent::Finished { index, reason } => {
                let Some(c) = self.choices.get_mut(index) else {
                    return out;
                };
                if c.finish.is_some() {
                    return out;
                }
                let tail = c.decoder.finish(tok).unwrap_or_default();
                let (mut text, stopped) = c.stop.push(&tail);
                if !stopped {
                    text.push_str(&c.stop.flush());
                }
                c.text.push_str(&text);
                if self.tools {
                    text = c.tool_filtered(false);
                }
                let reason = if stopped { "stop" } else { reason_str(reason) };
                if !text.is_empty() {
                    out.push(Out::Delta {
                        index,
                        text,
                        logprobs: Vec::new(),
                    });
                }
                out.extend(self.end_choice(index, reason));
            }
            SeqEvent::Failed { index, message } => {
                if let Some(c) = self.choices.get_mut(index) {
                    c.finish = Some("error");
                }
                out.push(Out::Error(message));
            }
        }
        out
    }

    /// Ends choice `index`: tool calls (if the reply holds them) or the held-back text, then
    /// the finish reason.
    fn end_choice(&mut self, index: usize, reason: &'static str) -> Vec<Out> {
        let mut out = Vec::new();
        let id_base = self.id.clone();
        let Some(c) = self.choices.get_mut(index) else {
            return out;
        };
        let mut reason = reason;
        if self.tools {
            let rest = c.tool_filtered(true);
            if !rest.is_empty() {
                out.push(Out::Delta {
                    index,
                    text: rest,
                    logprobs: Vec::new(),
                });
            }
            if let Some(p) = c.tool_start {
                let calls = parse_tool_calls(&c.text[p..], &format!("{id_base}_{index}"));
                if calls.is_empty() {
                    // Not a well-formed call: send the text as it is.
                    let raw = c.text[p..].to_string();
                    c.tool_start = None;
                    c.emitted = c.text.len();
                    out.push(Out::Delta {
                        index,
                        text: raw,
                        logprobs: Vec::new(),
                    });
                } else {
                    c.tool_calls = calls.clone();
                    reason = "tool_calls";
                    out.push(Out::ToolCalls { index, calls });
                }
            }
        }
        c.finish = Some(reason);
        out.push(Out::Finish { index, reason });
        out
    }

    fn token_text(&self, id: u32) -> String {
        self.st.tokenizer.decode(&[id], false)
    }

    fn chat_logprobs(&self, lps: &[(u32, TokenLogprobs)]) -> Value {
        let entry = |id: u32, lp: f32| {
            let t = self.token_text(id);
            json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|(id, l)| {
                let mut e = entry(*id, l.logprob);
                e["top_logprobs"] = Value::Array(l.top.iter().map(|&(t, lp)| entry(t, lp)).collect());
                e
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    fn completion_logprobs(&self, lps: &[(u32, TokenLogprobs)], offset: usize) -> Value {
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top = Vec::new();
        let mut offsets = Vec::new();
        let mut pos = offset;
        for (id, l) in lps {
            let t = self.token_text(*id);
            offsets.push(pos);
            pos += t.len();
            tokens.push(json!(t));
            token_logprobs.push(json!(l.logprob));
            let m: serde_json::Map<String, Value> = l
                .top
                .iter()
                .map(|&(t, lp)| (self.token_text(t), json!(lp)))
                .collect();
            top.push(Value::Object(m));
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
    }

    /// Waits for every choice and builds the non-streamed response.
    async fn collect(mut self) -> Result<Response, ApiError> {
        while !self.all_done() {
            let Some(ev) = self.rx.recv().await else {
                return Err(ApiError::internal("the engine stopped while generating"));
            };
            for o in self.on_event(ev) {
                if let Out::Error(m) = o {
                    return Err(ApiError::internal(m));
                }
            }
        }
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = c.finish.unwrap_or("stop");
                match self.kind {
                    Kind::Chat => json!({
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": match c.tool_start {
                                Some(p) if !c.tool_calls.is_empty() => {
                                    let t = c.text[..p].trim();
                                    if t.is_empty() { Value::Null } else { json!(t) }
                                }
                                _ => json!(c.text),
                            },
                            "refusal": null,
                            "tool_calls": c.tool_calls,
                        },
                        "logprobs": if self.params.logprobs.is_some() { self.chat_logprobs(&c.logprobs) } else { Value::Null },
                        "finish_reason": finish,
                    }),
                    Kind::Completion => {
                        let echo = self.echo.get(c.prompt).cloned().unwrap_or_default();
                        json!({
                            "index": i,
                            "text": format!("{echo}{}", c.text),
                            "logprobs": if self.params.logprobs.is_some() { self.completion_logprobs(&c.logprobs, echo.len()) } else { Value::Null },
                            "finish_reason": finish,
                        })
                    }
                }
            })
            .collect();
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        Ok(axum::Json(json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "graft",
            "choices": choices,
            "usage": self.usage(),
        }))
        .into_response())
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Event {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "graft",
            "choices": choices,
        });
        if self.params.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(v.to_string())
    }

    fn delta_choice(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> Value {
        match self.kind {
            Kind::Chat => {
                let logprobs = if self.params.logprobs.is_some() && !lps.is_empty() {
                    self.chat_logprobs(lps)
                } else {
                    Value::Null
                };
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Kind::Completion => {
                let c = &mut self.choices[index];
                let mut text = text;
                if !c.started {
                    c.started = true;
                    if let Some(e) = self.echo.get(c.prompt) {
                        text = format!("{e}{text}");
                    }
                }
                let logprobs = if self.params.logprobs.is_some() && !lps.is_empty() {
                    self.completion_logprobs(lps, 0)
                } else {
                    Value::Null
                };
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
        }
    }

    fn finish_choice(&mut self, index: usize, reason: &str) -> Value {
        match self.kind {
            Kind::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
            Kind::Completion => {
                let c = &mut self.choices[index];
                let mut text = String::new();
                if !c.started {
                    c.started = true;
                    if let Some(e) = self.echo.get(c.prompt) {
                        text = e.clone();
                    }
                }
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": reason})
            }
        }
    }

    fn into_sse(self) -> Response {
        let mut pending = VecDeque::new();
        if self.kind == Kind::Chat {
            for i in 0..self.choices.len() {
                pending.push_back(self.chunk(
                    vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
                    None,
                ));
            }
        }
        let stream = SseStream {
            job: self,
            pending,
            done: false,
        };
        let body = futures_util::stream::unfold(stream, |mut s| async move {
            s.next().await.map(|e| (Ok::<Event, Infallible>(e), s))
        });
        Sse::new(body).keep_alive(KeepAlive::default()).into_response()
    }
}

struct SseStream {
    job: Job,
    pending: VecDeque<Event>,
    done: bool,
}

impl SseStream {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            let ev = self.job.rx.recv().await;
            let outs = match ev {
                Some(ev) => self.job.on_event(ev),
                None => vec![Out::Error("the engine stopped while generating".into())],
            };
            for o in outs {
                match o {
                    Out::Delta {
                        index,
                        text,
                        logprobs,
                    } => {
                        let c = self.job.delta_choice(index, text, &logprobs);
                        self.pending.push_back(self.job.chunk(vec![c], None));
                    }
                    Out::Finish { index, reason } => {
                        let c = self.job.finish_choice(index, reason);
                        self.pending.push_back(self.job.chunk(vec![c], None));
                    }
                    Out::ToolCalls { index, calls } => {
                        let calls: Vec<Value> = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, mut c)| {
                                c["index"] = json!(i);
                                c
                            })
                            .collect();
                        let c = json!({"index": index, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null});
                        self.pending.push_back(self.job.chunk(vec![c], None));
                    }
                    Out::Error(m) => {
                        self.pending
                            .push_back(Event::default().data(ApiError::internal(m).body().to_string()));
                        self.pending.push_back(Event::default().data("[DONE]"));
                        self.done = true;
                        return self.pending.pop_front();
                    }
                }
            }
            if self.job.all_done() {
                if self.job.params.include_usage {
                    let u = self.job.usage();
                    self.pending.push_back(self.job.chunk(vec![], Some(u)));
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.done = true;
            }
        }
    }
}

fn encode_text(st: &AppState, text: &str, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
    st.tokenizer
        .encode(text, special)
        .map(|e| e.ids)
        .map_err(|e| ApiError::invalid(param, format!("cannot tokenize the {param}: {e}")))
}

/// vLLM's `/tokenize`: `prompt` (with `add_special_tokens`, default true) or chat `messages`
/// (rendered with the template) to token ids.
async fn tokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| {
        check_auth(&st, &headers)?;
        let obj = api::parse_body(&body)?;
        resolve_model(&st, api::opt_str(&obj, "model")?)?;
        let ids = if api::field(&obj, "messages").is_some() {
            let messages = api::parse_messages(&obj)?;
            let template = st
                .template
                .as_ref()
                .ok_or_else(|| ApiError::invalid("messages", "this model has no chat template"))?;
            let add = api::opt_bool(&obj, "add_generation_prompt")?.unwrap_or(true);
            let text = template
                .render_text(&messages, None, add, &serde_json::Map::new())
                .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?;
            encode_text(&st, &text, false, "messages")?
        } else {
            let prompt = api::opt_str(&obj, "prompt")?
                .ok_or_else(|| ApiError::invalid("prompt", "`prompt` or `messages` is required"))?;
            let special = api::opt_bool(&obj, "add_special_tokens")?.unwrap_or(true);
            encode_text(&st, prompt, special, "prompt")?
        };
        Ok(axum::Json(json!({
            "count": ids.len(),
            "max_model_len": st.engine.config().max_context,
            "tokens": ids,
        }))
        .into_response())
    })();
    finish(&st, r)
}

/// vLLM's `/detokenize`: token ids to text.
async fn detokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| {
        check_auth(&st, &headers)?;
        let obj = api::parse_body(&body)?;
        resolve_model(&st, api::opt_str(&obj, "model")?)?;
        let bad = || ApiError::invalid("tokens", "`tokens` must be an array of token ids");
        let ids: Vec<u32> = api::field(&obj, "tokens")
            .and_then(Value::as_array)
            .ok_or_else(bad)?
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| (x as usize) < st.vocab)
                    .map(|x| x as u32)
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()?;
        Ok(axum::Json(json!({"prompt": st.tokenizer.decode(&ids, false)})).into_response())
    })();
    finish(&st, r)
}

async fn chat_completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    st.metrics.chat_requests.fetch_add(1, Ordering::Relaxed);
    let r = chat_inner(&st, &headers, &body).await;
    finish(&st, r)
}

async fn chat_inner(st: &Arc<AppState>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    check_auth(st, headers)?;
    let obj = api::parse_body(body)?;
    let (model, adapter) = resolve_model(st, api::opt_str(&obj, "model")?)?;
    let messages = api::parse_messages(&obj)?;
    let params = api::parse_gen_params(&obj, true)?;
    let Some(template) = &st.template else {
        return Err(ApiError::invalid(
            "messages",
            "this model has no chat template: start the server with --chat-template FILE, or use /v1/completions",
        ));
    };
    let tools: Option<Vec<Value>> = match api::field(&obj, "tools") {
        None => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
    };
    let mut kwargs = match api::field(&obj, "chat_template_kwargs") {
        None => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "`chat_template_kwargs` must be an object",
            ));
        }
    };
    let continue_final = api::opt_bool(&obj, "continue_final_message")?.unwrap_or(false);
    let add_generation_prompt = api::opt_bool(&obj, "add_generation_prompt")?.unwrap_or(!continue_final);
    kwargs.remove("add_generation_prompt");
    let mut text = template
        .render_text(&messages, tools.as_deref(), add_generation_prompt, &kwargs)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?;
    if continue_final {
        // Drop whatever the template appended after the last message's content.
        if let Some(last) = messages.last() {
            let content = last.text();
            if let Some(pos) = text.rfind(&content) {
                text.truncate(pos + content.len());
            }
        }
    }
    // The template writes special tokens such as BOS itself.
    let ids = encode_text(st, &text, false, "messages")?;
    let stream = params.stream;
    let tool_choice_none = matches!(api::field(&obj, "tool_choice"), Some(Value::String(s)) if s == "none");
    let mut job = submit(st, Kind::Chat, model, adapter, vec![ids], params, vec![])?;
    job.tools = tools.as_ref().is_some_and(|t| !t.is_empty()) && !tool_choice_none;
    if stream {
        Ok(job.into_sse())
    } else {
        job.collect().await
    }
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    st.metrics.completion_requests.fetch_add(1, Ordering::Relaxed);
    let r = completions_inner(&st, &headers, &body).await;
    finish(&st, r)
}

fn parse_prompts(st: &AppState, obj: &Object) -> Result<Vec<Vec<u32>>, ApiError> {
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
    match api::field(obj, "prompt") {
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(vec![encode_text(st, s, true, "prompt")?]),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(bad)
                        .and_then(|s| encode_text(st, s, true, "prompt"))
                })
                .collect(),
            Value::Number(_) => Ok(vec![ids_of(a)?]),
            Value::Array(_) => a
                .iter()
                .map(|v| v.as_array().ok_or_else(bad).and_then(|x| ids_of(x)))
                .collect(),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

async fn completions_inner(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    check_auth(st, headers)?;
    let obj = api::parse_body(body)?;
    let (model, adapter) = resolve_model(st, api::opt_str(&obj, "model")?)?;
    let prompts = parse_prompts(st, &obj)?;
    let params = api::parse_gen_params(&obj, false)?;
    if api::field(&obj, "suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if let Some(b) = api::opt_i64(&obj, "best_of", 1, 128)?
        && b as usize != params.n
        && b != 1
    {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` other than `n` is not supported",
        ));
    }
    let echo = if api::opt_bool(&obj, "echo")?.unwrap_or(false) {
        prompts
            .iter()
            .map(|p| st.tokenizer.decode(p, params.skip_special_tokens))
            .collect()
    } else {
        vec![]
    };
    let stream = params.stream;
    let job = submit(st, Kind::Completion, model, adapter, prompts, params, echo)?;
    if stream {
        Ok(job.into_sse())
    } else {
        job.collect().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice() -> Choice {
        Choice {
            prompt: 0,
            decoder: IncrementalDecoder::new(true),
            stop: StopMatcher::new(&[], false),
            text: String::new(),
            tokens: 0,
            finish: None,
            cancel: Arc::new(AtomicBool::new(false)),
            logprobs: Vec::new(),
            started: false,
            emitted: 0,
            tool_start: None,
            tool_calls: Vec::new(),
        }
    }

    #[test]
    fn tool_calls_are_held_back_and_parsed() {
        let mut c = choice();
        let mut sent = String::new();
        for piece in [
            "Let me check. <tool",
            "_call>{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}</tool_call>",
        ] {
            c.text.push_str(piece);
            sent.push_str(&c.tool_filtered(false));
        }
        sent.push_str(&c.tool_filtered(true));
        assert_eq!(sent, "Let me check. ");
        let p = c.tool_start.unwrap();
        let calls = parse_tool_calls(&c.text[p..], "x");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(parse_tool_calls("<tool_call>not json</tool_call>", "x").is_empty());

        let mut c = choice();
        c.text.push_str("plain <tool");
        assert_eq!(c.tool_filtered(false), "plain ");
        assert_eq!(c.tool_filtered(true), "<tool");
    }
}
