//! Rewards computed outside graft: a long-lived command speaking JSON lines (`command`), an HTTP
//! endpoint (`http`), and an LLM judge behind any OpenAI-compatible chat endpoint, `graft serve`
//! included (`judge`). Each scores a whole batch per round trip ([`RewardFn::score_batch`]).
//!
//! What graft sends for each sample, on a line (`command`) or in `{"samples": [...]}` (`http`):
//! `{"prompt": "...", "completion": "...", "columns": {every other column of the row}}`.
//! What comes back, per sample: a number, or `{"reward": x}`, or `{"error": "why"}` (that sample
//! fails; the run stops or scores it 0 as its `on_error` says). `http` answers
//! `{"rewards": [x | null | {"error": ...}, ...]}`, one per sample, in order.

use super::{Options, RewardError, RewardFn, Sample};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The JSON graft sends for a sample.
fn sample_json(s: &Sample) -> Value {
    json!({"prompt": s.prompt, "completion": s.completion, "columns": s.columns})
}

/// One sample's answer: a number, `{"reward": x}`, or `{"error": "..."}`.
fn parse_answer(function: &str, v: &Value) -> Result<f64, RewardError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| RewardError::new(function, format!("the reward {n} is not a finite number"))),
        Value::Object(o) => {
            if let Some(e) = o.get("error") {
                let msg = e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string());
                return Err(RewardError::new(function, format!("the scorer says: {msg}")));
            }
            match o.get("reward") {
                Some(r) => parse_answer(function, r),
                None => Err(RewardError::new(
                    function,
                    format!(
                        "expected a number, {{\"reward\": x}} or {{\"error\": \"...\"}}, got {}",
                        short(&v.to_string())
                    ),
                )),
            }
        }
        other => Err(RewardError::new(
            function,
            format!(
                "expected a number, {{\"reward\": x}} or {{\"error\": \"...\"}}, got {}",
                short(&other.to_string())
            ),
        )),
    }
}

/// `s` cut to 200 characters for an error message.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn seconds(opts: &mut Options<'_>, key: &'static str, default: f64) -> Result<Duration, String> {
    Ok(Duration::from_secs_f64(
        opts.number(key, true)?.unwrap_or(default),
    ))
}

/// A running scorer process: its stdin, its stdout lines, the tail of its stderr.
struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// `command`: a long-lived process that reads one JSON line per sample on stdin and answers one
/// line per sample on stdout. Started on first use, restarted if it died, killed when the run ends.
pub struct CommandReward {
    argv: Vec<String>,
    cwd: Option<String>,
    timeout: Duration,
    running: Mutex<Option<Running>>,
}

impl CommandReward {
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let argv = match opts.value("command").cloned() {
            Some(Value::String(s)) if !s.trim().is_empty() => vec!["sh".into(), "-c".into(), s],
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
            Some(v) => {
                return Err(opts.err(
                    "command",
                    format!("must be a string or a list of strings, not {v}"),
                ));
            }
            None => return Err(opts.err("command", "is required (e.g. [\"python3\", \"score.py\"])")),
        };
        Ok(CommandReward {
            argv,
            cwd: opts.string("cwd")?,
            timeout: seconds(opts, "timeout_s", 60.0)?,
            running: Mutex::new(None),
        })
    }

    fn describe(&self) -> String {
        format!("`{}`", self.argv.join(" "))
    }

    fn start(&self) -> Result<Running, String> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.describe()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut q = t.lock().unwrap_or_else(|e| e.into_inner());
                q.push_back(line);
                if q.len() > 5 {
                    q.pop_front();
                }
            }
        });
        Ok(Running {
            child,
            stdin,
            lines,
            stderr: tail,
        })
    }

    /// Why the process failed: its exit status (if it exited) and its last stderr lines.
    fn failure(&self, r: &mut Running, what: &str) -> String {
        let status = match r.child.try_wait() {
            Ok(Some(s)) => format!(" ({s})"),
            _ => String::new(),
        };
        std::thread::sleep(Duration::from_millis(20));
        let tail: Vec<String> = r
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let tail = if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {}", short(&tail.join(" | ")))
        };
        format!("{} {what}{status}{tail}", self.describe())
    }

    fn round_trip(
        &self,
        r: &mut Running,
        samples: &[Sample],
    ) -> Result<Vec<Result<f64, RewardError>>, String> {
        let mut text = String::new();
        for s in samples {
            text.push_str(&sample_json(s).to_string());
            text.push('\n');
        }
        if r.stdin
            .write_all(text.as_bytes())
            .and_then(|_| r.stdin.flush())
            .is_err()
        {
            return Err(self.failure(r, "stopped reading its input"));
        }
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(samples.len());
        while out.len() < samples.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match r.lines.recv_timeout(left) {
                Ok(Ok(line)) if line.trim().is_empty() => {}
                Ok(Ok(line)) => {
                    let v: Value = serde_json::from_str(&line).map_err(|e| {
                        format!(
                            "{} answered a line that is not JSON ({e}): {}",
                            self.describe(),
                            short(&line)
                        )
                    })?;
                    out.push(parse_answer("command", &v));
                }
                Ok(Err(e)) => return Err(self.failure(r, &format!("output could not be read: {e}"))),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(
                        r,
                        &format!(
                            "exited after answering {} of {} samples",
                            out.len(),
                            samples.len()
                        ),
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} answered {} of {} samples within timeout_s = {}",
                        self.describe(),
                        out.len(),
                        samples.len(),
                        self.timeout.as_secs_f64()
                    ));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

impl RewardFn for CommandReward {
    fn name(&self) -> &str {
        "command"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        self.score_batch(std::slice::from_ref(s)).remove(0)
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<f64, RewardError>> {
        if samples.is_empty() {
            return Vec::new();
        }
        let mut guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // A process that died since the last batch is started again.
        if let Some(r) = guard.as_mut()
            && !matches!(r.child.try_wait(), Ok(None))
        {
            *guard = None;
        }
        if guard.is_none() {
            match self.start() {
                Ok(r) => *guard = Some(r),
                Err(e) => {
                    return samples
                        .iter()
                        .map(|_| Err(RewardError::new("command", e.clone())))
                        .collect();
                }
            }
        }
        let r = guard.as_mut().expect("started above");
        match self.round_trip(r, samples) {
            Ok(v) => v,
            Err(e) => {
                // Out of step with its answers: stop it; the next batch starts a fresh one.
                if let Some(mut r) = guard.take() {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
                samples
                    .iter()
                    .map(|_| Err(RewardError::new("command", e.clone())))
                    .collect()
            }
        }
    }
}

/// An HTTP client with a timeout, for `http` and `judge`.
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(format!("graft/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// POSTs `body` to `url` with `headers`; the reply's JSON, or what went wrong.
fn post_json(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(String, String)],
    body: &Value,
) -> Result<Value, String> {
    let mut req = agent.post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut resp = req
        .send(body.to_string())
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = resp.status();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("POST {url}: reading the reply: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST {url}: HTTP {status}: {}", short(&text)));
    }
    serde_json::from_str(&text)
        .map_err(|e| format!("POST {url}: the reply is not JSON ({e}): {}", short(&text)))
}

/// `Authorization: Bearer $VAR` when `api_key_env` names a set variable, plus `headers`.
fn headers(opts: &mut Options<'_>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    match opts.value("headers").cloned() {
        None => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                match v {
                    Value::String(s) => out.push((k, s)),
                    other => {
                        return Err(opts.err("headers", format!("values must be strings; `{k}` is {other}")));
                    }
                }
            }
        }
        Some(v) => return Err(opts.err("headers", format!("must be a table of strings, not {v}"))),
    }
    if let Some(var) = opts.string("api_key_env")? {
        let key = std::env::var(&var)
            .map_err(|_| opts.err("api_key_env", format!("names ${var}, which is not set")))?;
        out.push(("authorization".into(), format!("Bearer {key}")));
    }
    Ok(out)
}

/// `http`: POSTs `{"samples": [...]}` to `url` and reads `{"rewards": [...]}`.
pub struct HttpReward {
    url: String,
    headers: Vec<(String, String)>,
    agent: ureq::Agent,
}

impl HttpReward {
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let url = opts
            .string("url")?
            .ok_or_else(|| opts.err("url", "is required (e.g. \"http://127.0.0.1:9000/score\")"))?;
        let timeout = seconds(opts, "timeout_s", 60.0)?;
        Ok(HttpReward {
            url,
            headers: headers(opts)?,
            agent: agent(timeout),
        })
    }
}

impl RewardFn for HttpReward {
    fn name(&self) -> &str {
        "http"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        self.score_batch(std::slice::from_ref(s)).remove(0)
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<f64, RewardError>> {
        let body = json!({"samples": samples.iter().map(sample_json).collect::<Vec<_>>()});
        let all_fail = |e: String| {
            samples
                .iter()
                .map(|_| Err(RewardError::new("http", e.clone())))
                .collect()
        };
        let reply = match post_json(&self.agent, &self.url, &self.headers, &body) {
            Ok(v) => v,
            Err(e) => return all_fail(e),
        };
        let Some(list) = reply.get("rewards").and_then(Value::as_array) else {
            return all_fail(format!(
                "{}: expected {{\"rewards\": [...]}}, got {}",
                self.url,
                short(&reply.to_string())
            ));
        };
        if list.len() != samples.len() {
            return all_fail(format!(
                "{}: {} rewards for {} samples",
                self.url,
                list.len(),
                samples.len()
            ));
        }
        list.iter()
            .map(|v| match v {
                Value::Null => Err(RewardError::new(
                    "http",
                    format!("{}: null reward for this sample", self.url),
                )),
                v => parse_answer("http", v),
            })
            .collect()
    }
}

/// `judge`: asks an OpenAI-compatible chat endpoint to grade each completion with a prompt
/// template, and reads the first number of the reply (divided by `scale`).
pub struct JudgeReward {
    url: String,
    model: String,
    template: String,
    system: Option<String>,
    max_tokens: u64,
    temperature: f64,
    scale: f64,
    parallel: usize,
    headers: Vec<(String, String)>,
    agent: ureq::Agent,
}

/// The `{name}` placeholders of a template.
fn placeholders(t: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        match after.find('}') {
            Some(j) if after[..j].chars().all(|c| c.is_alphanumeric() || c == '_') && j > 0 => {
                out.push(after[..j].to_string());
                rest = &after[j + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// The first number in `text` (`8`, `-0.5`, `7/10` gives 7).
fn first_number(text: &str) -> Option<f64> {
    let re = regex::Regex::new(r"-?\d+(?:\.\d+)?").expect("valid regex");
    re.find(text).and_then(|m| m.as_str().parse().ok())
}

impl JudgeReward {
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let base = opts
            .string("base_url")?
            .ok_or_else(|| opts.err("base_url", "is required (e.g. \"http://127.0.0.1:8000/v1\")"))?;
        let model = opts
            .string("model")?
            .ok_or_else(|| opts.err("model", "is required"))?;
        let template = opts.string("prompt")?.ok_or_else(|| {
            opts.err(
                "prompt",
                "is required: the judge's instructions with {prompt} and {completion} (and {column} for any column)",
            )
        })?;
        let parallel = opts.number("parallel", true)?.unwrap_or(4.0) as usize;
        Ok(JudgeReward {
            url: format!("{}/chat/completions", base.trim_end_matches('/')),
            model,
            template,
            system: opts.string("system")?,
            max_tokens: opts.number("max_tokens", true)?.unwrap_or(16.0) as u64,
            temperature: opts.number("temperature", false)?.unwrap_or(0.0),
            scale: opts.number("scale", true)?.unwrap_or(10.0),
            parallel: parallel.max(1),
            headers: headers(opts)?,
            agent: agent(seconds(opts, "timeout_s", 60.0)?),
        })
    }

    /// The judge's prompt for one sample; an unknown placeholder is an error naming it.
    fn render(&self, s: &Sample) -> Result<String, RewardError> {
        let mut out = self.template.clone();
        for name in placeholders(&self.template) {
            let value = match name.as_str() {
                "prompt" => s.prompt.to_string(),
                "completion" => s.completion.to_string(),
                col => match s.columns.get(col) {
                    Some(Value::String(v)) => v.clone(),
                    Some(v) => v.to_string(),
                    None => {
                        return Err(RewardError::new(
                            "judge",
                            format!(
                                "the prompt's placeholder {{{col}}} is neither prompt, completion nor a column of this row"
                            ),
                        ));
                    }
                },
            };
            out = out.replace(&format!("{{{name}}}"), &value);
        }
        Ok(out)
    }

    fn grade(&self, s: &Sample) -> Result<f64, RewardError> {
        let user = self.render(s)?;
        let mut messages = Vec::new();
        if let Some(sys) = &self.system {
            messages.push(json!({"role": "system", "content": sys}));
        }
        messages.push(json!({"role": "user", "content": user}));
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        let reply = post_json(&self.agent, &self.url, &self.headers, &body)
            .map_err(|e| RewardError::new("judge", e))?;
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                RewardError::new(
                    "judge",
                    format!(
                        "{}: no choices[0].message.content in {}",
                        self.url,
                        short(&reply.to_string())
                    ),
                )
            })?;
        let n = first_number(text).ok_or_else(|| {
            RewardError::new(
                "judge",
                format!("the judge's reply has no number: {}", short(text)),
            )
        })?;
        Ok(n / self.scale)
    }
}

impl RewardFn for JudgeReward {
    fn name(&self) -> &str {
        "judge"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        self.grade(s)
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<f64, RewardError>> {
        let mut out: Vec<Option<Result<f64, RewardError>>> = vec![None; samples.len()];
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = Mutex::new(&mut out);
        std::thread::scope(|scope| {
            for _ in 0..self.parallel.min(samples.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= samples.len() {
                            break;
                        }
                        let r = self.grade(&samples[i]);
                        results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    }
                });
            }
        });
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(RewardError::new("judge", "not graded"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_fns::from_config;
    use serde_json::Map;
    use std::io::Read;
    use std::net::TcpListener;

    fn sample<'a>(completion: &'a str, columns: &'a Map<String, Value>) -> Sample<'a> {
        Sample {
            prompt: "What is 2+2?",
            completion,
            columns,
        }
    }

    /// A one-shot HTTP server on 127.0.0.1: answers each request with `reply(body)` (status,
    /// JSON text); returns its base URL and the bodies it received.
    fn server(
        n: usize,
        reply: impl Fn(&Value) -> (u16, String) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<Vec<Value>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for _ in 0..n {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                let body = loop {
                    let k = c.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..k]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        while buf.len() < p + 4 + len {
                            let k = c.read(&mut chunk).unwrap();
                            buf.extend_from_slice(&chunk[..k]);
                        }
                        break buf[p + 4..p + 4 + len].to_vec();
                    }
                };
                let v: Value = serde_json::from_slice(&body).unwrap();
                let (status, text) = reply(&v);
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                bodies.push(v);
            }
            bodies
        });
        (url, h)
    }

    #[test]
    fn command_scores_batches_and_restarts_after_a_crash() {
        let dir = std::env::temp_dir().join(format!("graft-cmd-reward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("score.py");
        // Reward = completion length; "crash" exits; "err" answers an error object.
        std::fs::write(
            &script,
            "import sys, json\nfor line in sys.stdin:\n    s = json.loads(line)\n    c = s['completion']\n    \
             if c == 'crash':\n        sys.stderr.write('boom\\n'); sys.exit(3)\n    \
             if c == 'err':\n        print(json.dumps({'error': 'no answer column'}), flush=True); continue\n    \
             print(json.dumps({'reward': len(c) + len(s['columns'].get('answer', ''))}), flush=True)\n",
        )
        .unwrap();
        let f = from_config(
            "command",
            &json!({"command": ["python3", script.to_str().unwrap()]}),
        )
        .unwrap();
        let mut cols = Map::new();
        cols.insert("answer".into(), json!("4"));
        let got = f.score_batch(&[sample("abc", &cols), sample("err", &cols), sample("hello", &cols)]);
        assert_eq!(got[0], Ok(4.0));
        assert!(got[1].as_ref().unwrap_err().message.contains("no answer column"));
        assert_eq!(got[2], Ok(6.0));
        let crashed = f.score_batch(&[sample("crash", &cols)]);
        let e = crashed[0].as_ref().unwrap_err().message.clone();
        assert!(e.contains("exited") && e.contains("boom"), "{e}");
        // A fresh process answers the next batch.
        assert_eq!(f.score_batch(&[sample("xy", &cols)])[0], Ok(3.0));
    }

    #[test]
    fn command_reports_garbage_and_timeouts() {
        let f = from_config(
            "command",
            &json!({"command": "while read l; do echo not-json; done"}),
        )
        .unwrap();
        let cols = Map::new();
        let e = f.score(&sample("a", &cols)).unwrap_err().message;
        assert!(e.contains("not JSON") && e.contains("not-json"), "{e}");
        let f = from_config("command", &json!({"command": "sleep 30", "timeout_s": 0.3})).unwrap();
        let t0 = Instant::now();
        let e = f.score(&sample("a", &cols)).unwrap_err().message;
        assert!(
            e.contains("timeout_s = 0.3") && t0.elapsed() < Duration::from_secs(5),
            "{e}"
        );
        let e = from_config("command", &json!({})).err().unwrap();
        assert!(e.contains("command"), "{e}");
    }

    #[test]
    fn http_sends_the_batch_and_checks_the_reply() {
        let (url, h) = server(3, |body| {
            let n = body["samples"].as_array().unwrap().len();
            match body["samples"][0]["completion"].as_str().unwrap() {
                "fail" => (500, "{\"detail\": \"down\"}".into()),
                "short" => (200, "{\"rewards\": [1.0]}".into()),
                _ => (
                    200,
                    json!({"rewards": (0..n).map(|i| i as f64 * 0.5).collect::<Vec<_>>()}).to_string(),
                ),
            }
        });
        let f = from_config(
            "http",
            &json!({"url": format!("{url}/score"), "headers": {"x-team": "rl"}}),
        )
        .unwrap();
        let mut cols = Map::new();
        cols.insert("answer".into(), json!("4"));
        let got = f.score_batch(&[sample("a", &cols), sample("b", &cols)]);
        assert_eq!(got, vec![Ok(0.0), Ok(0.5)]);
        let e = f
            .score_batch(&[sample("fail", &cols)])
            .remove(0)
            .unwrap_err()
            .message;
        assert!(e.contains("HTTP 500") && e.contains("down"), "{e}");
        let e = f
            .score_batch(&[sample("short", &cols), sample("b", &cols)])
            .remove(0)
            .unwrap_err()
            .message;
        assert!(e.contains("1 rewards for 2 samples"), "{e}");
        let bodies = h.join().unwrap();
        assert_eq!(bodies[0]["samples"][1]["completion"], "b");
        assert_eq!(bodies[0]["samples"][0]["columns"]["answer"], "4");
        assert_eq!(bodies[0]["samples"][0]["prompt"], "What is 2+2?");
    }

    #[test]
    fn judge_fills_the_template_and_reads_the_first_number() {
        let (url, h) = server(2, |body| {
            let user = body["messages"][1]["content"].as_str().unwrap().to_string();
            let text = if user.contains("good") {
                "Score: 8/10"
            } else {
                "I cannot grade this."
            };
            (
                200,
                json!({"choices": [{"message": {"role": "assistant", "content": text}}]}).to_string(),
            )
        });
        let f = from_config(
            "judge",
            &json!({
                "base_url": format!("{url}/v1"),
                "model": "judge-model",
                "system": "You grade answers.",
                "prompt": "Q: {prompt}\nA: {completion}\nReference: {answer}\nScore 0-10:",
                "parallel": 1,
            }),
        )
        .unwrap();
        let mut cols = Map::new();
        cols.insert("answer".into(), json!("4"));
        let got = f.score_batch(&[sample("good", &cols), sample("bad", &cols)]);
        assert_eq!(got[0], Ok(0.8));
        assert!(got[1].as_ref().unwrap_err().message.contains("no number"));
        let bodies = h.join().unwrap();
        assert_eq!(bodies[0]["model"], "judge-model");
        assert_eq!(
            bodies[0]["messages"][1]["content"],
            "Q: What is 2+2?\nA: good\nReference: 4\nScore 0-10:"
        );
        // An unknown placeholder names itself.
        let f = from_config(
            "judge",
            &json!({"base_url": "http://127.0.0.1:9/v1", "model": "m", "prompt": "{solution}"}),
        )
        .unwrap();
        let e = f.score(&sample("x", &cols)).unwrap_err().message;
        assert!(e.contains("{solution}"), "{e}");
    }
}
