//! End-to-end tests of the server over real HTTP on 127.0.0.1 with the stories260K model (a
//! real Llama with its tokenizer; a ChatML-like chat template is added at test time). Skipped,
//! with a printed reason, when `../shared/data` is absent.

use graft_kernels::{Cpu, Precision};
use graft_model::model::{Model, WeightStorage};
use graft_model::peft::{LoraAdapter, LoraAdapterConfig, LoraModule, save_peft_adapter};
use graft_model::sample::SamplingParams;
use graft_serve::{RunningServer, ServeOptions};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

fn stories_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/models/stories260K/hf");
    if d.join("model.safetensors").is_file() {
        Some(d)
    } else {
        eprintln!(
            "skipping: {} is absent (the stories260K model lives in ../shared/data)",
            d.display()
        );
        None
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "graft-serve-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of stories260K with a chat template, plus adapters `a` and `b` under `adapters/`.
struct Fixture {
    root: PathBuf,
    model_dir: PathBuf,
    adapters: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn random_adapter(spec: &graft_model::ModelSpec, seed: u64, modules: &[LoraModule]) -> LoraAdapter {
    let mut a = LoraAdapter::zeros(LoraAdapterConfig::new(4, 8.0, modules), spec);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
    };
    for layer in &mut a.layers {
        for m in LoraModule::ALL {
            if let Some(p) = layer.get_mut(m) {
                p.a.iter_mut().for_each(|x| *x = next());
                p.b.iter_mut().for_each(|x| *x = next());
            }
        }
    }
    a
}

fn fixture() -> Option<Fixture> {
    let src = stories_dir()?;
    let root = temp_dir("fx");
    let model_dir = root.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model_dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = model_dir.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(TEMPLATE);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let spec = graft_model::weights::load_model(&model_dir).unwrap().spec;
    let adapters = root.join("adapters");
    for (name, seed, mods) in [
        ("a", 1, &[LoraModule::Q, LoraModule::V][..]),
        ("b", 2, &LoraModule::ALL[..]),
    ] {
        let d = adapters.join(name);
        std::fs::create_dir_all(&d).unwrap();
        save_peft_adapter(&d, &random_adapter(&spec, seed, mods), None).unwrap();
    }
    // Not loaded at startup: hot-loaded by the tests.
    let spare = root.join("spare");
    for (name, seed) in [("c", 3), ("d", 4)] {
        let d = spare.join(name);
        std::fs::create_dir_all(&d).unwrap();
        save_peft_adapter(
            &d,
            &random_adapter(&spec, seed, &[LoraModule::Q, LoraModule::O]),
            None,
        )
        .unwrap();
    }
    Some(Fixture {
        root,
        model_dir,
        adapters,
    })
}

fn load(
    fx: &Fixture,
) -> (
    Model<Cpu>,
    graft_data::Tokenizer,
    Option<graft_data::ChatTemplate>,
) {
    let loaded = graft_model::weights::load_model(&fx.model_dir).unwrap();
    let model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).unwrap();
    let (tok, tpl) = graft_data::load_tokenizer_and_template(&fx.model_dir).unwrap();
    (model, tok, tpl)
}

fn start(fx: &Fixture, tweak: impl FnOnce(&mut ServeOptions)) -> RunningServer {
    let (model, tok, tpl) = load(fx);
    assert!(tpl.is_some(), "the fixture has a chat template");
    let mut o = ServeOptions::new("stories");
    o.precision = Precision::Exact;
    o.adapters_dir = Some(fx.adapters.clone());
    o.adapter_roots = vec![fx.root.join("spare")];
    tweak(&mut o);
    let state = graft_serve::build_state(model, tok, tpl, &o).unwrap();
    graft_serve::spawn(state, "127.0.0.1:0").unwrap()
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    auth: Option<&str>,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = auth {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    s
}

fn read_response(s: TcpStream) -> Resp {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).unwrap();
            body.extend_from_slice(&buf[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Resp {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Resp {
    read_response(send_request(addr, method, path, body, None))
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Resp {
    call(addr, "POST", path, Some(&body))
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let m = call(addr, "GET", "/metrics", None).body;
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn greedy_reference(fx: &Fixture, adapter: Option<&str>, prompt: &str, max_tokens: usize) -> String {
    let (mut model, tok, _) = load(fx);
    if let Some(name) = adapter {
        let a = graft_model::peft::load_peft_adapter(&fx.adapters.join(name), &model.spec).unwrap();
        model.set_adapter(&a);
    }
    let ids = tok.encode(prompt, true).unwrap().ids;
    let stop = tok.eos_ids().to_vec();
    let (out, _) = model.generate(
        &ids,
        max_tokens,
        SamplingParams::default(),
        &stop,
        Precision::Exact,
        |_| true,
    );
    let mut all = ids.clone();
    all.extend(&out);
    let full = tok.decode(&all, true);
    let head = tok.decode(&ids, true);
    full[head.len()..].to_string()
}

#[test]
fn health_models_and_metrics() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let h = call(srv.addr, "GET", "/health", None);
    assert_eq!(h.status, 200);
    let m = call(srv.addr, "GET", "/v1/models", None);
    assert_eq!(m.status, 200);
    let v = m.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories", "a", "b"]);
    assert_eq!(v["data"][1]["parent"], "stories");
    assert_eq!(v["data"][0]["object"], "model");
    let metrics = call(srv.addr, "GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("# TYPE graft_time_to_first_token_seconds histogram")
    );
    assert!(metrics.body.contains("graft_adapters_loaded 2"));
    let t = post(srv.addr, "/tokenize", json!({"prompt": "Once upon a time"}));
    assert_eq!(t.status, 200, "{}", t.body);
    let ids = t.json()["tokens"].clone();
    assert_eq!(t.json()["count"], ids.as_array().unwrap().len());
    let d = post(srv.addr, "/detokenize", json!({"tokens": ids}));
    assert!(d.json()["prompt"].as_str().unwrap().contains("Once upon a time"));
    let t = post(
        srv.addr,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(t.json()["count"].as_u64().unwrap() > 2);
    let nf = call(srv.addr, "GET", "/v1/nothing", None);
    assert_eq!(nf.status, 404);
    assert!(nf.json()["error"]["message"].is_string());
}

#[test]
fn chat_stream_and_non_stream_agree() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let req = json!({
        "model": "stories",
        "messages": [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}],
        "temperature": 0,
        "max_tokens": 20,
    });
    let r = post(srv.addr, "/v1/chat/completions", req.clone());
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    let ct = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=20).contains(&ct));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + ct
    );
    let fr = choice["finish_reason"].as_str().unwrap();
    assert!(fr == "length" || fr == "stop");
    if fr == "length" {
        assert_eq!(ct, 20);
    }

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let s = post(srv.addr, "/v1/chat/completions", sreq);
    assert_eq!(s.status, 200);
    assert!(s.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = sse_events(&s.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(ch) = c["choices"].as_array().and_then(|a| a.first()) {
            if let Some(t) = ch["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish.as_deref(), Some(fr));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"].as_u64().unwrap(), ct);

    // With tools (this template ignores them) the reply is the same text, streamed or not.
    let mut treq = req.clone();
    treq["tools"] =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let t = post(srv.addr, "/v1/chat/completions", treq.clone()).json();
    assert_eq!(t["choices"][0]["message"]["content"].as_str().unwrap(), text);
    assert_eq!(t["choices"][0]["message"]["tool_calls"], json!([]));
    treq["stream"] = json!(true);
    let s = post(srv.addr, "/v1/chat/completions", treq);
    let streamed: String = sse_events(&s.body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, text);
}

#[test]
fn greedy_completions_equal_generate_with_mixed_adapters() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let prompt = "Once upon a time, there was a little";
    let max_tokens = 24;
    let addr = srv.addr;
    let handles: Vec<_> = [None, Some("a"), Some("b"), Some("a"), None, Some("b")]
        .into_iter()
        .map(|adapter| {
            std::thread::spawn(move || {
                let r = post(
                    addr,
                    "/v1/completions",
                    json!({"model": adapter.unwrap_or("stories"), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                (adapter, r.json()["choices"][0]["text"].as_str().unwrap().to_string())
            })
        })
        .collect();
    let results: Vec<(Option<&str>, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut refs = std::collections::HashMap::new();
    for adapter in [None, Some("a"), Some("b")] {
        refs.insert(adapter, greedy_reference(&fx, adapter, prompt, max_tokens));
    }
    assert_ne!(refs[&None], refs[&Some("a")], "adapters must change the output");
    assert_ne!(refs[&Some("a")], refs[&Some("b")]);
    for (adapter, text) in results {
        assert_eq!(text, refs[&adapter], "adapter {adapter:?}");
    }
    assert!(metric(addr, "graft_engine_steps_total") > 0.0);
}

#[test]
fn sampling_seed_n_stop_and_logprobs() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let req = json!({"model": "a", "prompt": "Lily and Ben", "max_tokens": 16, "temperature": 1.0, "seed": 7, "n": 3});
    let r1 = post(srv.addr, "/v1/completions", req.clone()).json();
    let r2 = post(srv.addr, "/v1/completions", req).json();
    assert_eq!(r1["choices"].as_array().unwrap().len(), 3);
    assert_eq!(r1["choices"], r2["choices"], "same seed, same samples");
    assert_eq!(r1["object"], "text_completion");

    let greedy = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": "Lily and Ben", "max_tokens": 20, "temperature": 0}),
    )
    .json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let words: Vec<&str> = greedy.split_whitespace().collect();
    assert!(words.len() > 3, "{greedy}");
    let stop = words[2].to_string();
    let cut = greedy.find(&stop).unwrap();
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": "Lily and Ben", "max_tokens": 20, "temperature": 0, "stop": [stop]}),
    )
    .json();
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), &greedy[..cut]);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    )
    .json();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[test]
fn invalid_requests_get_openai_errors() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let bad = read_response({
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let body = "{not json";
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        s
    });
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            "max_tokens",
        ),
        (json!({"messages": "hello"}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 0}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 3}),
            "top_p",
        ),
    ] {
        let r = post(srv.addr, "/v1/chat/completions", body);
        assert_eq!(r.status, 400);
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(param));
    }
    let r = post(srv.addr, "/v1/completions", json!({"prompt": [[1, 2], [99999]]}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "prompt");
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let long = "word ".repeat(600);
    let r = post(srv.addr, "/v1/completions", json!({"prompt": long}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert!(metric(srv.addr, "graft_request_errors_total") >= 8.0);
}

#[test]
fn api_keys_are_required_when_configured() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| o.api_keys = vec!["sk-test".into()]);
    let r = call(srv.addr, "GET", "/v1/models", None);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = read_response(send_request(srv.addr, "GET", "/v1/models", None, Some("wrong")));
    assert_eq!(r.status, 401);
    let r = read_response(send_request(srv.addr, "GET", "/v1/models", None, Some("sk-test")));
    assert_eq!(r.status, 200);
    let body = json!({"prompt": "hi", "max_tokens": 2});
    assert_eq!(
        read_response(send_request(
            srv.addr,
            "POST",
            "/v1/completions",
            Some(&body),
            None
        ))
        .status,
        401
    );
    assert_eq!(
        read_response(send_request(
            srv.addr,
            "POST",
            "/v1/completions",
            Some(&body),
            Some("sk-test")
        ))
        .status,
        200
    );
    assert_eq!(call(srv.addr, "GET", "/health", None).status, 200);
}

/// Reads an SSE response until the first content chunk arrives.
fn read_until_first_token(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut seen = String::new();
    let t0 = Instant::now();
    while !seen.contains("\"text\"") && !seen.contains("\"content\":\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0 && t0.elapsed() < Duration::from_secs(60));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn full_queue_gets_429_and_disconnect_cancels() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.max_batch = 1;
        o.max_queue = 2;
        o.max_context = Some(8192);
    });
    let addr = srv.addr;
    let long =
        json!({"prompt": "Once", "max_tokens": 8000, "ignore_eos": true, "stream": true, "temperature": 0});
    // A runs; B (n = 2) fills the queue; C is refused.
    let mut a = send_request(addr, "POST", "/v1/completions", Some(&long), None);
    read_until_first_token(&mut a);
    let mut b_body = long.clone();
    b_body["n"] = json!(2);
    let b = send_request(addr, "POST", "/v1/completions", Some(&b_body), None);
    wait_for(|| metric(addr, "graft_queue_depth") == 2.0, "B to be queued");
    let c = post(addr, "/v1/completions", json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(c.status, 429, "{}", c.body);
    assert!(c.header("retry-after").is_some());
    assert_eq!(c.json()["error"]["code"], "rate_limit_exceeded");
    // Closing B's connection drops it from the queue; closing A's cancels its generation.
    drop(b);
    wait_for(
        || metric(addr, "graft_queue_depth") == 0.0,
        "B to leave the queue",
    );
    drop(a);
    wait_for(
        || metric(addr, "graft_active_sequences") == 0.0,
        "A to be cancelled",
    );
    assert!(metric(addr, "graft_sequences_cancelled_total") >= 3.0);
    assert!(metric(addr, "graft_generation_tokens_total") < 8000.0);
    let ok = post(addr, "/v1/completions", json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(ok.status, 200);
}

#[test]
fn adapters_hot_load_and_unload() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| o.max_context = Some(4096));
    let addr = srv.addr;
    let spare = fx.root.join("spare");
    let r = post(
        addr,
        "/v1/adapters",
        json!({"name": "c", "path": spare.join("c").display().to_string()}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], "c");
    let r = post(
        addr,
        "/v1/adapters",
        json!({"name": "c", "path": spare.join("c").display().to_string()}),
    );
    assert_eq!(r.status, 409);
    let r = post(
        addr,
        "/v1/adapters",
        json!({"name": "../evil", "path": spare.join("c").display().to_string()}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "name");
    // Outside the roots (the startup adapters dir is a root, its parent is not).
    let r = post(
        addr,
        "/v1/adapters",
        json!({"name": "x", "path": fx.model_dir.display().to_string()}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post(
        addr,
        "/v1/adapters",
        json!({"name": "x", "path": spare.join("../adapters/../model").display().to_string()}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let models = call(addr, "GET", "/v1/models", None).json();
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "c"));
    let r = post(
        addr,
        "/v1/completions",
        json!({"model": "c", "prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(r.status, 200);
    // vLLM-style load with a path relative to a root.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        json!({"lora_name": "d", "lora_path": "d"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Unloading while a request uses it: the request finishes, new ones get 404.
    let mut s = send_request(
        addr,
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": "d", "prompt": "Once", "max_tokens": 1500, "ignore_eos": true, "stream": true, "temperature": 0}),
        ),
        None,
    );
    read_until_first_token(&mut s);
    let r = call(addr, "DELETE", "/v1/adapters/d", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        addr,
        "/v1/completions",
        json!({"model": "d", "prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(r.status, 404);
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("\"finish_reason\":\"length\""),
        "the in-flight request finished"
    );
    assert!(rest.contains("[DONE]"));
    assert_eq!(call(addr, "DELETE", "/v1/adapters/d", None).status, 404);
    assert_eq!(call(addr, "DELETE", "/v1/adapters/c", None).status, 200);
    let models = call(addr, "GET", "/v1/models", None).json();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
}

#[test]
fn closing_a_non_streamed_request_cancels_it() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| o.max_context = Some(8192));
    let addr = srv.addr;
    let body =
        json!({"model": "b", "prompt": "Once", "max_tokens": 8000, "ignore_eos": true, "temperature": 0});
    let s = send_request(addr, "POST", "/v1/completions", Some(&body), None);
    wait_for(
        || metric(addr, "graft_active_sequences") == 1.0,
        "the request to run",
    );
    drop(s);
    wait_for(
        || metric(addr, "graft_active_sequences") == 0.0,
        "the request to be cancelled",
    );
    assert!(metric(addr, "graft_sequences_cancelled_total") >= 1.0);
    assert!(metric(addr, "graft_generation_tokens_total") < 8000.0);
}

#[test]
fn zero_queue_still_admits_into_free_batch_slots() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.max_batch = 1;
        o.max_queue = 0;
        o.max_context = Some(8192);
    });
    let addr = srv.addr;
    let long = json!({"prompt": "Once", "max_tokens": 8000, "ignore_eos": true, "stream": true});
    let mut a = send_request(addr, "POST", "/v1/completions", Some(&long), None);
    read_until_first_token(&mut a);
    let r = post(addr, "/v1/completions", json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 429);
    drop(a);
    wait_for(
        || metric(addr, "graft_active_sequences") == 0.0,
        "A to be cancelled",
    );
    let r = post(addr, "/v1/completions", json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn kv_budget_makes_sequences_wait_instead_of_overcommitting() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.max_batch = 8;
        o.kv_cache_tokens = Some(300);
    });
    let addr = srv.addr;
    // Each reserves ~2 + 200 positions: only one fits at a time, yet all complete.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/completions",
                    json!({"prompt": "Once", "max_tokens": 200, "ignore_eos": true, "temperature": 0}),
                )
            })
        })
        .collect();
    let mut seen_active = 0.0f64;
    while !handles.iter().all(|h| h.is_finished()) {
        seen_active = seen_active.max(metric(addr, "graft_active_sequences"));
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["completion_tokens"], 200);
    }
    assert!(
        seen_active <= 1.0,
        "at most one sequence fits the budget, saw {seen_active}"
    );
}

#[test]
fn chat_messages_need_content_and_a_known_role() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let user = json!({"role": "user", "content": "hi"});
    for (messages, param) in [
        (
            json!([user, {"role": "assistant"}, {"role": "user", "content": "x"}]),
            "messages[1].content",
        ),
        (
            json!([{"role": "system", "content": "s"}, user, {"role": "user", "content": null}]),
            "messages[2].content",
        ),
        (json!([{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (json!([{"content": "hi"}]), "messages[0].role"),
        (json!([user, {"role": 7, "content": "hi"}]), "messages[1].role"),
        (
            json!([user, {"role": "assistant", "content": null, "tool_calls": []}]),
            "messages[1].content",
        ),
    ] {
        for path in ["/v1/chat/completions", "/tokenize"] {
            let r = post(srv.addr, path, json!({"messages": messages, "max_tokens": 2}));
            assert_eq!(r.status, 400, "{path} {messages}: {}", r.body);
            let e = r.json();
            assert_eq!(e["error"]["param"], param, "{e}");
            assert_eq!(e["error"]["type"], "invalid_request_error");
            assert!(e["error"]["message"].as_str().unwrap().contains(param), "{e}");
        }
    }
    // An assistant turn that only calls tools has no content; a tool answers it.
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
    let ok = json!([
        user,
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "developer", "content": "be brief"},
    ]);
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": ok, "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_request_that_can_never_fit_the_queue_is_a_400() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.max_batch = 1;
        o.max_queue = 2;
    });
    // 2 prompts × n = 2 = 4 sequences; at most 1 running + 2 waiting fit.
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": ["Once", "Lily"], "n": 2, "max_tokens": 2}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.header("retry-after").is_none());
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "n");
    assert!(e["error"]["message"].as_str().unwrap().contains('3'), "{e}");
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 4, "max_tokens": 2}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // Three fit on an idle server.
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": "Once", "n": 3, "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Every string in `v`, recursively.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

#[test]
fn responses_show_no_server_paths_and_do_not_reveal_existence() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let addr = srv.addr;
    let loaded = post(addr, "/v1/adapters", json!({"name": "c", "path": "c"}));
    assert_eq!(loaded.status, 200, "{}", loaded.body);
    let root = fx.root.canonicalize().unwrap().display().to_string();
    let tmp = std::env::temp_dir().display().to_string();
    for r in [
        loaded,
        call(addr, "GET", "/v1/models", None),
        call(addr, "GET", "/v1/models/c", None),
        call(addr, "GET", "/v1/adapters", None),
    ] {
        let v = r.json();
        let mut all = Vec::new();
        strings(&v, &mut all);
        for s in all {
            assert!(!s.contains(&root) && !s.contains(&tmp), "a server path in {v}");
        }
    }
    let models = call(addr, "GET", "/v1/models", None).json();
    for m in models["data"].as_array().unwrap() {
        assert_eq!(m["root"], "stories", "{m}");
    }
    // A missing path and an existing one outside the roots get the same answer.
    let answers: Vec<(u16, Value)> = ["/nonexistent/adapter", &fx.model_dir.display().to_string()]
        .into_iter()
        .map(|path| {
            let r = post(addr, "/v1/adapters", json!({"name": "x", "path": path}));
            let mut e = r.json();
            let m = e["error"]["message"].as_str().unwrap().replace(path, "PATH");
            e["error"]["message"] = json!(m);
            (r.status, e)
        })
        .collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, 403);
    assert_eq!(answers[0].1["error"]["param"], "path");
}

#[test]
fn adapter_files_outside_the_roots_and_non_finite_weights_are_refused() {
    let Some(fx) = fixture() else { return };
    let spare = fx.root.join("spare");
    let outside = fx.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let spec = graft_model::weights::load_model(&fx.model_dir).unwrap().spec;
    save_peft_adapter(&outside, &random_adapter(&spec, 5, &[LoraModule::Q]), None).unwrap();
    // `e` links its weights, `f` its config, to files outside every root.
    for (name, linked) in [("e", "adapter_model.safetensors"), ("f", "adapter_config.json")] {
        let d = spare.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            if file == linked {
                std::os::unix::fs::symlink(outside.join(file), d.join(file)).unwrap();
            } else {
                std::fs::copy(outside.join(file), d.join(file)).unwrap();
            }
        }
    }
    // `g` has a NaN in one tensor, `h` an infinity.
    for (name, bad) in [("g", f32::NAN), ("h", f32::INFINITY)] {
        let mut a = random_adapter(&spec, 6, &[LoraModule::Q, LoraModule::V]);
        a.layers[1].get_mut(LoraModule::V).as_mut().unwrap().b[3] = bad;
        let d = spare.join(name);
        std::fs::create_dir_all(&d).unwrap();
        save_peft_adapter(&d, &a, None).unwrap();
    }
    let srv = start(&fx, |_| {});
    for (name, linked) in [("e", "adapter_model.safetensors"), ("f", "adapter_config.json")] {
        let r = post(srv.addr, "/v1/adapters", json!({"name": name, "path": name}));
        assert_eq!(r.status, 403, "{name}: {}", r.body);
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(linked), "{m}");
        assert!(!m.contains(&outside.display().to_string()), "{m}");
    }
    for name in ["g", "h"] {
        let r = post(srv.addr, "/v1/adapters", json!({"name": name, "path": name}));
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            m.contains("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
            "{m}"
        );
    }
    let models = call(srv.addr, "GET", "/v1/models", None).json();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
}

#[test]
fn tool_choice_is_auto_none_or_refused() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let req = |choice: Value| json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": tools, "tool_choice": choice});
    for choice in [json!("auto"), json!("none")] {
        let r = post(srv.addr, "/v1/chat/completions", req(choice));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "f"}}),
        json!("sometimes"),
        json!(3),
    ] {
        let r = post(srv.addr, "/v1/chat/completions", req(choice.clone()));
        assert_eq!(r.status, 400, "{choice}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["param"], "tool_choice");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains("auto") && m.contains("none"), "{m}");
    }
}

#[test]
fn wrong_methods_get_openai_errors() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    let r = call(srv.addr, "GET", "/v1/chat/completions", None);
    assert_eq!(r.status, 405);
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("POST"),
        "{e} {:?}",
        r.headers
    );
    assert_eq!(call(srv.addr, "DELETE", "/v1/models", None).status, 405);
}

/// Sends a POST whose body is `len` bytes of JSON, with an optional API key.
fn post_sized(addr: SocketAddr, path: &str, len: usize, auth: Option<&str>) -> Resp {
    let text = format!("\"{}\"", "x".repeat(len.saturating_sub(12)));
    let body = format!("{{\"prompt\":{text}}}");
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = auth {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    read_response(s)
}

#[test]
fn oversized_bodies_are_checked_after_the_api_key_and_get_openai_errors() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.api_keys = vec!["sk-test".into()];
        o.max_body_bytes = 1024;
    });
    let r = post_sized(srv.addr, "/v1/completions", 4000, None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = post_sized(srv.addr, "/v1/completions", 4000, Some("sk-test"));
    assert_eq!(r.status, 413, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("1024"), "{e}");
    let r = post_sized(srv.addr, "/v1/completions", 600, Some("sk-test"));
    assert_ne!(r.status, 413, "{}", r.body);
}

#[test]
fn health_reports_a_stopped_engine() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |_| {});
    assert_eq!(call(srv.addr, "GET", "/health", None).status, 200);
    srv.state.engine.stop();
    let h = call(srv.addr, "GET", "/health", None);
    assert_eq!(h.status, 503, "{}", h.body);
    let e = h.json();
    assert_eq!(e["error"]["code"], "engine_unavailable");
    assert!(e["error"]["message"].as_str().unwrap().contains("engine"), "{e}");
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
}

#[test]
fn shutdown_drains_then_cuts_open_requests_with_an_error() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| {
        o.shutdown_grace = Duration::from_secs(1);
        o.max_context = Some(16384);
    });
    let addr = srv.addr;
    let long = json!({"prompt": "Once", "max_tokens": 16000, "ignore_eos": true, "temperature": 0});
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let mut s = send_request(addr, "POST", "/v1/completions", Some(&streamed), None);
    read_until_first_token(&mut s);
    let collected = send_request(addr, "POST", "/v1/completions", Some(&long), None);
    wait_for(
        || metric(addr, "graft_active_sequences") == 2.0,
        "both requests to run",
    );
    let t0 = Instant::now();
    let stopping = std::thread::spawn(move || srv.stop());
    // Draining: new requests get 503 with an error object.
    wait_for(
        || call(addr, "GET", "/health", None).status == 503,
        "the drain to begin",
    );
    let r = post(addr, "/v1/completions", json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "server_shutting_down");
    // After the grace period the stream ends with an error event, then [DONE].
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    let err = rest.find("\"server_shutting_down\"").expect("an error event");
    let done = rest.rfind("[DONE]").expect("[DONE]");
    assert!(err < done, "{rest}");
    let r = read_response(collected);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "server_shutting_down");
    let report = stopping.join().unwrap();
    assert_eq!(report.cut, 2);
    assert!(t0.elapsed() >= Duration::from_secs(1));
}

#[test]
fn shutdown_lets_requests_finish_within_the_grace_period() {
    let Some(fx) = fixture() else { return };
    let srv = start(&fx, |o| o.shutdown_grace = Duration::from_secs(30));
    let addr = srv.addr;
    let body = json!({"prompt": "Once", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let mut s = send_request(addr, "POST", "/v1/completions", Some(&body), None);
    read_until_first_token(&mut s);
    let t0 = Instant::now();
    let report = srv.stop();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(!rest.contains("\"error\""), "{rest}");
    assert_eq!(report.cut, 0);
    assert!(t0.elapsed() < Duration::from_secs(20));
}
