//! Response assembly: a submitted generation ([`Job`]) turns the engine's per-token events into
//! text (incremental detokenization, stop strings, held-back tool calls) and answers either as
//! one OpenAI JSON object ([`Job::collect`]) or as server-sent event chunks ([`Job::into_sse`]).

use crate::api::GenParams;
use crate::drain::InFlight;
use crate::engine::{SeqEvent, TokenLogprobs};
use crate::error::ApiError;
use crate::state::AppState;
use crate::text::{IncrementalDecoder, StopMatcher};
use crate::tools::{ToolCallFilter, parse_tool_calls};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use graft_model::infer::FinishReason;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc::UnboundedReceiver;

/// Which OpenAI endpoint a job answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// Per-choice decoding state.
pub(crate) struct Choice {
    /// Which prompt of the request this choice continues.
    prompt: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    text: String,
    tokens: usize,
    finish: Option<&'static str>,
    cancel: Arc<AtomicBool>,
    logprobs: Vec<(u32, TokenLogprobs)>,
    started: bool,
    /// Holds back `<tool_call>` blocks (chat requests with tools).
    tools: ToolCallFilter,
    /// Parsed tool calls (OpenAI `tool_calls` objects).
    tool_calls: Vec<Value>,
}

impl Choice {
    /// A choice continuing prompt `prompt`, decoding with `decoder` (already primed with the
    /// prompt) and ending early through `cancel`.
    pub(crate) fn new(
        prompt: usize,
        decoder: IncrementalDecoder,
        params: &GenParams,
        cancel: Arc<AtomicBool>,
    ) -> Choice {
        Choice {
            prompt,
            decoder,
            stop: StopMatcher::new(&params.stop, params.include_stop_str_in_output),
            text: String::new(),
            tokens: 0,
            finish: None,
            cancel,
            logprobs: Vec::new(),
            started: false,
            tools: ToolCallFilter::new(),
            tool_calls: Vec::new(),
        }
    }
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
pub struct Job {
    pub(crate) st: Arc<AppState>,
    pub(crate) endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) created: u64,
    pub(crate) params: GenParams,
    pub(crate) prompt_tokens: usize,
    pub(crate) choices: Vec<Choice>,
    pub(crate) rx: UnboundedReceiver<SeqEvent>,
    /// Decoded prompts put in front of the text (completions with `echo`).
    pub(crate) echo: Vec<String>,
    /// Parse Hermes-style tool calls out of the replies (chat with `tools`).
    pub(crate) tools: bool,
    /// Registered with the shutdown drain, which may cut the job.
    pub(crate) in_flight: InFlight,
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

impl Job {
    /// Answers as server-sent events when the request asked to `stream`, else as one object.
    pub async fn respond(self) -> Result<Response, ApiError> {
        if self.params.stream {
            Ok(self.into_sse())
        } else {
            self.collect().await
        }
    }

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
                    text = c.tools.release(&c.text, false);
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
                    text = c.tools.release(&c.text, false);
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
        let id_base = format!("{}_{index}", self.id);
        let Some(c) = self.choices.get_mut(index) else {
            return out;
        };
        let mut reason = reason;
        if self.tools {
            let rest = c.tools.release(&c.text, true);
            if !rest.is_empty() {
                out.push(Out::Delta {
                    index,
                    text: rest,
                    logprobs: Vec::new(),
                });
            }
            if let Some(p) = c.tools.start() {
                let calls = parse_tool_calls(&c.text[p..], &id_base);
                if calls.is_empty() {
                    // Not a well-formed call: send the text as it is.
                    out.push(Out::Delta {
                        index,
                        text: c.tools.release_block(&c.text),
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

    /// The error a job cut by the shutdown ends with.
    fn cut_error(&self) -> ApiError {
        ApiError::unavailable(
            format!(
                "The server shut down before this response finished: it was cut after the {} s shutdown grace period.",
                self.st.shutdown_grace.as_secs_f64()
            ),
            "server_shutting_down",
        )
    }

    /// The next engine event (`None`: the engine is gone), or `Err` when the shutdown cuts
    /// the job.
    async fn next_event(&mut self) -> Result<Option<SeqEvent>, ApiError> {
        tokio::select! {
            ev = self.rx.recv() => Ok(ev),
            () = self.in_flight.cut() => Err(self.cut_error()),
        }
    }

    /// Waits for every choice and builds the non-streamed response.
    pub async fn collect(mut self) -> Result<Response, ApiError> {
        while !self.all_done() {
            let Some(ev) = self.next_event().await? else {
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
            .map(|(i, c)| self.final_choice(i, c))
            .collect();
        Ok(axum::Json(json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "graft",
            "choices": choices,
            "usage": self.usage(),
        }))
        .into_response())
    }

    fn final_choice(&self, i: usize, c: &Choice) -> Value {
        let finish = c.finish.unwrap_or("stop");
        match self.endpoint {
            Endpoint::Chat => json!({
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": match c.tools.start() {
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
            Endpoint::Completion => {
                let echo = self.echo.get(c.prompt).cloned().unwrap_or_default();
                json!({
                    "index": i,
                    "text": format!("{echo}{}", c.text),
                    "logprobs": if self.params.logprobs.is_some() { self.completion_logprobs(&c.logprobs, echo.len()) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Event {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
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
        match self.endpoint {
            Endpoint::Chat => {
                let logprobs = if self.params.logprobs.is_some() && !lps.is_empty() {
                    self.chat_logprobs(lps)
                } else {
                    Value::Null
                };
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Endpoint::Completion => {
                let mut text = text;
                let logprobs = if self.params.logprobs.is_some() && !lps.is_empty() {
                    self.completion_logprobs(lps, 0)
                } else {
                    Value::Null
                };
                let c = &mut self.choices[index];
                if !c.started {
                    c.started = true;
                    if let Some(e) = self.echo.get(c.prompt) {
                        text = format!("{e}{text}");
                    }
                }
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
        }
    }

    fn finish_choice(&mut self, index: usize, reason: &str) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
            Endpoint::Completion => {
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

    fn tool_calls_choice(index: usize, calls: Vec<Value>) -> Value {
        let calls: Vec<Value> = calls
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                c["index"] = json!(i);
                c
            })
            .collect();
        json!({"index": index, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null})
    }

    /// The response as server-sent events: one chunk per piece of text, tool calls and finish
    /// reason, then (with `include_usage`) a usage chunk and `[DONE]`.
    pub fn into_sse(self) -> Response {
        let mut pending = VecDeque::new();
        if self.endpoint == Endpoint::Chat {
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
    /// Ends the stream with an error event (an OpenAI error object) and `[DONE]`.
    fn fail(&mut self, e: ApiError) {
        self.pending
            .push_back(Event::default().data(e.body().to_string()));
        self.pending.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            let outs = match self.job.next_event().await {
                Ok(Some(ev)) => self.job.on_event(ev),
                Ok(None) => vec![Out::Error("the engine stopped while generating".into())],
                Err(cut) => {
                    self.fail(cut);
                    continue;
                }
            };
            for o in outs {
                let choice = match o {
                    Out::Delta {
                        index,
                        text,
                        logprobs,
                    } => self.job.delta_choice(index, text, &logprobs),
                    Out::Finish { index, reason } => self.job.finish_choice(index, reason),
                    Out::ToolCalls { index, calls } => Job::tool_calls_choice(index, calls),
                    Out::Error(m) => {
                        self.fail(ApiError::internal(m));
                        break;
                    }
                };
                self.pending.push_back(self.job.chunk(vec![choice], None));
            }
            if !self.done && self.job.all_done() {
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
