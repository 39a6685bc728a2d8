//! What each endpoint does, without HTTP: typed requests from [`crate::api`] in, [`Job`]s or
//! JSON values out. Chat rendering, prompt checks, seeds and submission to the engine; model
//! objects; adapter loading and unloading; tokenization.

use crate::api::{
    ChatRequest, CompletionRequest, DetokenizeRequest, GenParams, LoadAdapterRequest, Prompt, TokenizeInput,
    TokenizeRequest,
};
use crate::engine::{SeqRequest, SubmitError};
use crate::error::ApiError;
use crate::registry::{AdapterEntry, RegistryError};
use crate::response::{Choice, Endpoint, Job};
use crate::state::AppState;
use crate::text::IncrementalDecoder;
use axum::http::StatusCode;
use graft_data::Message;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Renders a conversation with the chat template (`tools` and extra template variables included).
fn render_chat(
    st: &AppState,
    messages: &[Message],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
    kwargs: &serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    let template = st.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template: start the server with --chat-template FILE, or use /v1/completions",
        )
    })?;
    template
        .render_text(messages, tools, add_generation_prompt, kwargs)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))
}

/// Submits a chat completion.
pub fn chat(st: &Arc<AppState>, project: &str, req: ChatRequest) -> Result<Job, ApiError> {
    let (model, adapter) = st.resolve_model(req.model.as_deref(), project)?;
    let mut text = render_chat(
        st,
        &req.messages,
        req.tools.as_deref(),
        req.add_generation_prompt,
        &req.chat_template_kwargs,
    )?;
    if req.continue_final_message {
        // Drop whatever the template appended after the last message's content.
        if let Some(last) = req.messages.last() {
            let content = last.text();
            if let Some(pos) = text.rfind(&content) {
                text.truncate(pos + content.len());
            }
        }
    }
    // The template writes special tokens such as BOS itself.
    let ids = st.encode(&text, false, "messages")?;
    let tools = req.parses_tool_calls();
    let mut job = submit(st, Endpoint::Chat, model, adapter, vec![ids], req.params, vec![])?;
    job.tools = tools;
    Ok(job)
}

/// Submits a text completion.
pub fn completion(st: &Arc<AppState>, project: &str, req: CompletionRequest) -> Result<Job, ApiError> {
    let (model, adapter) = st.resolve_model(req.model.as_deref(), project)?;
    let prompts = match req.prompt {
        Prompt::Texts(texts) => texts
            .iter()
            .map(|t| st.encode(t, true, "prompt"))
            .collect::<Result<Vec<_>, _>>()?,
        Prompt::Tokens(ids) => ids,
    };
    let echo = if req.echo {
        prompts
            .iter()
            .map(|p| st.tokenizer.decode(p, req.params.skip_special_tokens))
            .collect()
    } else {
        vec![]
    };
    submit(
        st,
        Endpoint::Completion,
        model,
        adapter,
        prompts,
        req.params,
        echo,
    )
}

/// Checks the prompts, builds `n` sequences per prompt and queues them all.
fn submit(
    st: &Arc<AppState>,
    endpoint: Endpoint,
    model: String,
    adapter: Option<Arc<AdapterEntry>>,
    prompts: Vec<Vec<u32>>,
    params: GenParams,
    echo: Vec<String>,
) -> Result<Job, ApiError> {
    let max_context = st.engine.config().max_context;
    let param = if endpoint == Endpoint::Chat {
        "messages"
    } else {
        "prompt"
    };
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
    let sequences = prompts.len() * params.n;
    let limit = st.engine.max_request_sequences();
    let too_large = || {
        let param = if params.n > 1 { "n" } else { param };
        ApiError::too_many_sequences(param, sequences, limit)
    };
    if sequences > limit {
        return Err(too_large());
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
            // The completion is what the new ids add to the prompt's text (leading space kept).
            let decoder = IncrementalDecoder::after(&st.tokenizer, p, params.skip_special_tokens);
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
            choices.push(Choice::new(pi, decoder, &params, cancel));
        }
    }
    match st.engine.submit(seqs) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => {
            return Err(ApiError::queue_full(st.engine.config().max_queue));
        }
        Err(SubmitError::TooLarge) => return Err(too_large()),
        Err(SubmitError::Stopped) => {
            return Err(ApiError::unavailable(
                "the engine has stopped",
                "engine_unavailable",
            ));
        }
    }
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    Ok(Job {
        in_flight: st.drain.track(),
        st: st.clone(),
        endpoint,
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

/// `/health`: whether the engine loop is alive and answering within `timeout`.
pub async fn health(st: &AppState) -> Result<Value, ApiError> {
    st.engine
        .ping(st.health_timeout)
        .await
        .map_err(|e| ApiError::unavailable(format!("unhealthy: {e}"), "engine_unavailable"))?;
    Ok(json!({"status": "ok"}))
}

/// vLLM's `/tokenize`: the token ids of a prompt or of a rendered conversation.
pub fn tokenize(st: &AppState, project: &str, req: TokenizeRequest) -> Result<Value, ApiError> {
    st.resolve_model(req.model.as_deref(), project)?;
    let ids = match req.input {
        TokenizeInput::Messages {
            messages,
            add_generation_prompt,
        } => {
            let text = render_chat(
                st,
                &messages,
                None,
                add_generation_prompt,
                &serde_json::Map::new(),
            )?;
            st.encode(&text, false, "messages")?
        }
        TokenizeInput::Prompt {
            text,
            add_special_tokens,
        } => st.encode(&text, add_special_tokens, "prompt")?,
    };
    Ok(json!({
        "count": ids.len(),
        "max_model_len": st.engine.config().max_context,
        "tokens": ids,
    }))
}

/// vLLM's `/detokenize`: the text of token ids.
pub fn detokenize(st: &AppState, project: &str, req: DetokenizeRequest) -> Result<Value, ApiError> {
    st.resolve_model(req.model.as_deref(), project)?;
    if req.tokens.iter().any(|&t| t as usize >= st.vocab) {
        return Err(crate::api::bad_tokens());
    }
    Ok(json!({"prompt": st.tokenizer.decode(&req.tokens, false)}))
}

/// The OpenAI model object of the base model (`adapter` `None`) or of an adapter. Like vLLM,
/// `root` is the base model's id; no field holds a server path.
pub fn model_object(st: &AppState, id: &str, adapter: Option<&AdapterEntry>) -> Value {
    match adapter {
        None => json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "graft",
            "root": st.base_name,
            "parent": null,
            "max_model_len": st.engine.config().max_context,
        }),
        Some(a) => json!({
            "id": a.name,
            "object": "model",
            "created": a.created,
            "owned_by": "graft",
            "root": st.base_name,
            "parent": st.base_name,
            "max_model_len": st.engine.config().max_context,
            "lora_rank": a.config.r,
        }),
    }
}

/// `/v1/models`: the base model, then every adapter and fine-tuned model `project` may use.
pub fn list_models(st: &AppState, project: &str) -> Result<Value, ApiError> {
    let mut data = vec![model_object(st, &st.base_name, None)];
    let loaded = st.registry.list();
    data.extend(
        loaded
            .iter()
            .filter(|a| a.visible_to(project))
            .map(|a| model_object(st, &a.name, Some(a))),
    );
    if let Some(jobs) = &st.jobs {
        for m in jobs.list_models(project).map_err(crate::error::jobs_error)? {
            if !loaded.iter().any(|a| a.name == m.id) {
                data.push(json!({
                    "id": m.id, "object": "model", "created": m.created, "owned_by": project,
                    "root": st.base_name, "parent": st.base_name,
                    "max_model_len": st.engine.config().max_context,
                }));
            }
        }
    }
    Ok(json!({"object": "list", "data": data}))
}

/// `/v1/models/{id}`.
pub fn get_model(st: &AppState, project: &str, id: &str) -> Result<Value, ApiError> {
    let (name, adapter) = st.resolve_model(Some(id), project)?;
    Ok(model_object(st, &name, adapter.as_deref()))
}

/// `DELETE /v1/models/{id}`: a fine-tuned model of `project` is deleted (no longer listed or
/// served); an adapter is unloaded.
pub fn delete_model(st: &AppState, project: &str, id: &str) -> Result<Value, ApiError> {
    if let Some(jobs) = &st.jobs
        && id.starts_with("ft:")
        && let Some(v) = jobs.delete_model(project, id).map_err(crate::error::jobs_error)?
    {
        let _ = st.registry.remove(id);
        st.update_adapter_gauge();
        return Ok(v);
    }
    if id == st.base_name || st.base_aliases.iter().any(|a| a == id) {
        return Err(ApiError::invalid("model", "the base model cannot be deleted"));
    }
    unload_adapter(st, project, id, "model")
}

/// `/v1/adapters`: the loaded adapters `project` may use.
pub fn list_adapters(st: &AppState, project: &str) -> Value {
    let data: Vec<Value> = st
        .registry
        .list()
        .iter()
        .filter(|a| a.visible_to(project))
        .map(|a| model_object(st, &a.name, Some(a)))
        .collect();
    json!({"object": "list", "data": data})
}

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

/// Loads an adapter (on a blocking thread: it reads and uploads the weights).
pub async fn load_adapter(
    st: &Arc<AppState>,
    project: &str,
    req: LoadAdapterRequest,
) -> Result<Value, ApiError> {
    let reg = st.registry.clone();
    let (name, path) = (req.name.clone(), req.path.clone());
    // With API keys, an adapter belongs to the project that loaded it.
    let owner = (!st.api_keys.is_empty()).then(|| project.to_string());
    let entry = tokio::task::spawn_blocking(move || reg.load(&name, &path, owner.as_deref()))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))?
        .map_err(|e| registry_error(e, req.name_field, req.path_field))?;
    st.update_adapter_gauge();
    Ok(model_object(st, &entry.name, Some(&entry)))
}

/// Unloads an adapter; requests already using it finish with it.
pub fn unload_adapter(st: &AppState, project: &str, name: &str, param: &str) -> Result<Value, ApiError> {
    if st.registry.get(name).is_some_and(|a| !a.visible_to(project)) {
        return Err(registry_error(
            RegistryError::NotFound(name.into()),
            param,
            "path",
        ));
    }
    st.registry
        .remove(name)
        .map_err(|e| registry_error(e, param, "path"))?;
    st.update_adapter_gauge();
    Ok(json!({"id": name, "object": "model", "deleted": true}))
}
