//! Rewards computed outside graft: a long-lived command speaking JSON lines (`command`), an HTTP
//! endpoint (`http`), and an LLM judge behind any OpenAI-compatible chat endpoint, `graft serve`
//! included (`judge`). `command` and `http` score a whole batch per round trip
//! ([`RewardFn::score_batch`]); `judge` sends one chat request per sample, `parallel` at a time.
//!
//! What graft sends for each sample — one line on the command's stdin, or one element of the
//! `http` body's `"samples"` list:
//!
//! ```json
//! {"prompt": "What is 2+2?", "completion": "4", "columns": {"answer": "4", "id": 17}}
//! ```
//!
//! `columns` holds every other column of the dataset row, as the row has it. What comes back,
//! per sample: a number (`0.5`), `{"reward": 0.5}`, or `{"error": "why"}` — that sample cannot be
//! scored, and the trainer stops or scores it 0 as its `on_error` says.
//!
//! `command` answers one line per sample, in order, each line one of the three forms; lines
//! that are empty are skipped. `http` answers one JSON object for the batch,
//! `{"rewards": [0.5, {"reward": 1}, {"error": "..."}, null, ...]}`, one element per sample in
//! order, where `null` is an error for that sample.
//!
//! Errors name the function, the command or URL, and what came back: the line that is not JSON,
//! the answer that holds no reward, the exit status and the last stderr lines of a command that
//! exited, the count answered before a timeout, the HTTP status and body of a failed request.

use super::code::kill_group;
use super::{Options, RewardError, RewardFn, Sample};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The JSON graft sends for a sample: `{"prompt", "completion", "columns"}`.
fn sample_json(s: &Sample) -> Value {
    json!({"prompt": s.prompt, "completion": s.completion, "columns": s.columns})
}

/// One sample's answer from `source` (a command or URL, for the message): a number,
/// `{"reward": x}`, or `{"error": "..."}`.
fn parse_answer(function: &str, source: &str, v: &Value) -> Result<f64, RewardError> {
    let unexpected = |got: &Value| {
        RewardError::new(
            function,
            format!(
                "{source} answered {}; expected a number, {{\"reward\": x}} or {{\"error\": \"...\"}}",
                short(&got.to_string())
            ),
        )
    };
    match v {
        Value::Number(n) => n.as_f64().filter(|x| x.is_finite()).ok_or_else(|| unexpected(v)),
        Value::Object(o) => {
            if let Some(e) = o.get("error") {
                let msg = e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string());
                return Err(RewardError::new(
                    function,
                    format!("{source} says: {}", short(&msg)),
                ));
            }
            match o.get("reward") {
                Some(r @ Value::Number(_)) => parse_answer(function, source, r),
                _ => Err(unexpected(v)),
            }
        }
        other => Err(unexpected(other)),
    }
}

/// `s` cut to 200 characters for an error message, `…` marking the cut.
pub(crate) fn short(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A duration option in seconds (`> 0`), `default` when not given.
pub(crate) fn seconds(opts: &mut Options<'_>, key: &'static str, default: f64) -> Result<Duration, String> {
    Ok(Duration::from_secs_f64(
        opts.number(key, true)?.unwrap_or(default),
    ))
}

/// A whole-number option `>= 1`, `default` when not given.
pub(crate) fn whole(opts: &mut Options<'_>, key: &'static str, default: u64) -> Result<u64, String> {
    match opts.number(key, true)? {
        None => Ok(default),
        Some(x) if x.fract() == 0.0 && x >= 1.0 => Ok(x as u64),
        Some(x) => Err(opts.err(key, format!("must be a whole number >= 1, not {x}"))),
    }
}

/// The same error for every sample of a batch.
fn all_fail(function: &str, n: usize, message: &str) -> Vec<Result<f64, RewardError>> {
    (0..n).map(|_| Err(RewardError::new(function, message))).collect()
}

/// How many stderr lines of a `command` process its errors quote.
const STDERR_LINES: usize = 5;

/// The last stderr lines of a process, and whether its stderr has closed.
#[derive(Default)]
struct StderrTail {
    lines: VecDeque<String>,
    closed: bool,
}

/// A running scorer process: the channel to the thread writing its stdin, its stdout lines (read
/// by a thread, so that a timeout can be kept), and the tail of its stderr.
struct Running {
    child: Child,
    input: Sender<String>,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<StderrTail>>,
}

impl Running {
    /// Kills the process and everything it started (it leads its own process group), and reaps it.
    fn stop(mut self) {
        kill_group(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `command`: a long-lived process that reads one JSON line per sample on stdin and answers one
/// line per sample on stdout (see the [module docs](self) for both shapes). Started on the first
/// batch, kept running across batches, and killed — with its process group — when the function
/// is dropped. A process that exited between batches is started again (a batch that finds it gone
/// before any answer is sent to a fresh one, once). One that falls out of step within a batch —
/// it exits, times out, or answers a line that is not JSON — is killed: the answers it gave
/// before stand, the rest of the batch fails with the reason, and the next batch starts afresh.
///
/// The process runs in its own process group, so that killing it kills what it started too; if
/// graft itself dies, the process sees its stdin close and should exit.
///
/// Options: `command`, a list `[program, args...]` or a string run by `sh -c`; `cwd`, the
/// working directory (default graft's); `timeout_s`, the time one batch may take (default 60).
pub struct CommandReward {
    argv: Vec<String>,
    shown: String,
    cwd: Option<String>,
    timeout: Duration,
    running: Mutex<Option<Running>>,
}

impl CommandReward {
    /// Reads the options `command` (required), `cwd` and `timeout_s`; starts nothing yet.
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let (argv, shown) = match opts.value("command").cloned() {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                (vec!["sh".into(), "-c".into(), s.clone()], format!("`{s}`"))
            }
            Some(Value::Array(a))
                if a.first().and_then(Value::as_str).is_some_and(|p| !p.is_empty())
                    && a.iter().all(Value::is_string) =>
            {
                let argv: Vec<String> = a
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect();
                let shown = format!("`{}`", argv.join(" "));
                (argv, shown)
            }
            Some(v) => {
                return Err(opts.err(
                    "command",
                    format!("must be a non-empty string or list of strings [program, args...], not {v}"),
                ));
            }
            None => {
                return Err(opts.err(
                    "command",
                    "is required (e.g. [\"python3\", \"score.py\"], or a line for sh -c)",
                ));
            }
        };
        Ok(CommandReward {
            argv,
            shown,
            cwd: opts.string("cwd")?,
            timeout: seconds(opts, "timeout_s", 60.0)?,
            running: Mutex::new(None),
        })
    }

    /// Starts the process in its own process group, with a thread writing its stdin, one reading
    /// its stdout lines and one keeping its last stderr lines.
    fn start(&self) -> Result<Running, String> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| {
            let cwd = match &self.cwd {
                Some(d) => format!(" in {d}"),
                None => String::new(),
            };
            format!("cannot start {}{cwd}: {e}", self.shown)
        })?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three were piped");
        };
        let (input, batches) = channel::<String>();
        std::thread::spawn(move || {
            for text in batches {
                if stdin
                    .write_all(text.as_bytes())
                    .and_then(|_| stdin.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut q = t.lock().unwrap_or_else(|e| e.into_inner());
                q.lines.push_back(line);
                if q.lines.len() > STDERR_LINES {
                    q.lines.pop_front();
                }
            }
            t.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        });
        Ok(Running {
            child,
            input,
            lines,
            stderr: tail,
        })
    }

    /// `what` went wrong with the process: the message with its exit status (if it exits within
    /// a second) and its last stderr lines.
    fn failure(&self, r: &mut Running, what: &str, wait_for_exit: bool) -> String {
        let limit = Instant::now()
            + if wait_for_exit {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
        let status = loop {
            match r.child.try_wait() {
                Ok(Some(s)) => break format!(" ({s})"),
                Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(5)),
                _ => break String::new(),
            }
        };
        // The stderr thread may still be reading what the process wrote just before it exited.
        let limit = Instant::now() + Duration::from_millis(if status.is_empty() { 20 } else { 500 });
        let tail = loop {
            let q = r.stderr.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed || Instant::now() >= limit {
                break q.lines.iter().cloned().collect::<Vec<_>>();
            }
            drop(q);
            std::thread::sleep(Duration::from_millis(5));
        };
        let tail = if tail.is_empty() {
            String::new()
        } else {
            format!(
                "; its stderr ends: {}",
                tail.iter().map(|l| short(l)).collect::<Vec<_>>().join(" | ")
            )
        };
        format!("{} {what}{status}{tail}", self.shown)
    }

    /// Sends the batch and reads one answer line per sample within the timeout: the answers, in
    /// order, and why the rest are missing when the process fell out of step (it exited, timed
    /// out, answered a line that is not JSON) and must be stopped.
    fn round_trip(
        &self,
        r: &mut Running,
        samples: &[Sample],
    ) -> (Vec<Result<f64, RewardError>>, Option<Failure>) {
        let mut out = Vec::with_capacity(samples.len());
        // A line still waiting from the last batch means the answers no longer line up.
        match r.lines.try_recv() {
            Ok(Ok(line)) if !line.trim().is_empty() => {
                let e = format!(
                    "{} answered more lines than it was sent samples; the extra line: {}",
                    self.shown,
                    short(&line)
                );
                return (out, Some(Failure::OutOfStep(e)));
            }
            Ok(Ok(_)) | Err(TryRecvError::Empty) => {}
            Ok(Err(_)) | Err(TryRecvError::Disconnected) => {
                let e = self.failure(r, "closed its output before this batch", true);
                return (out, Some(Failure::Gone(e)));
            }
        }
        let mut text = String::new();
        for s in samples {
            text.push_str(&sample_json(s).to_string());
            text.push('\n');
        }
        if r.input.send(text).is_err() {
            let e = self.failure(r, "stopped reading its input", true);
            return (out, Some(Failure::Gone(e)));
        }
        let deadline = Instant::now() + self.timeout;
        while out.len() < samples.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match r.lines.recv_timeout(left) {
                Ok(Ok(line)) if line.trim().is_empty() => {}
                Ok(Ok(line)) => match serde_json::from_str::<Value>(line.trim()) {
                    Ok(v) => out.push(parse_answer("command", &self.shown, &v)),
                    Err(e) => {
                        let e = format!(
                            "{} answered sample {} of {} with a line that is not JSON ({e}): {}",
                            self.shown,
                            out.len() + 1,
                            samples.len(),
                            short(&line)
                        );
                        return (out, Some(Failure::OutOfStep(e)));
                    }
                },
                Ok(Err(e)) => {
                    let e = self.failure(r, &format!("wrote output that cannot be read: {e}"), false);
                    return (out, Some(Failure::OutOfStep(e)));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let what = format!(
                        "exited after answering {} of {} samples",
                        out.len(),
                        samples.len()
                    );
                    let e = self.failure(r, &what, true);
                    return (out, Some(Failure::Gone(e)));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let what = format!(
                        "answered {} of {} samples within timeout_s = {}",
                        out.len(),
                        samples.len(),
                        self.timeout.as_secs_f64()
                    );
                    let e = self.failure(r, &what, false);
                    return (out, Some(Failure::OutOfStep(e)));
                }
            }
        }
        (out, None)
    }
}

/// Why a `command` batch stopped short.
enum Failure {
    /// The process exited or closed its pipes.
    Gone(String),
    /// It is running but its answers can no longer be matched to samples.
    OutOfStep(String),
}

impl Failure {
    /// The error message.
    fn message(self) -> String {
        match self {
            Failure::Gone(m) | Failure::OutOfStep(m) => m,
        }
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() {
            r.stop();
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
        let dead = guard
            .as_mut()
            .is_some_and(|r| !matches!(r.child.try_wait(), Ok(None)));
        if dead && let Some(r) = guard.take() {
            r.stop();
        }
        let mut fresh = false;
        loop {
            if guard.is_none() {
                match self.start() {
                    Ok(r) => *guard = Some(r),
                    Err(e) => return all_fail("command", samples.len(), &e),
                }
                fresh = true;
            }
            let r = guard.as_mut().expect("started above");
            let (mut out, failed) = self.round_trip(r, samples);
            let Some(failed) = failed else {
                return out;
            };
            // Out of step with its answers: stop it; the next batch starts a fresh one.
            if let Some(r) = guard.take() {
                r.stop();
            }
            // A process kept from an earlier batch that went away before answering this one
            // (it exited between batches) is started again for this batch, once.
            if !fresh && out.is_empty() && matches!(failed, Failure::Gone(_)) {
                continue;
            }
            let e = failed.message();
            out.extend((out.len()..samples.len()).map(|_| Err(RewardError::new("command", e.as_str()))));
            return out;
        }
    }
}

/// What `http`, `judge` and the OpenAI graders send requests with: the agent, the timeout of one request, and the
/// extra headers.
pub(crate) struct Client {
    agent: ureq::Agent,
    timeout: Duration,
    headers: Vec<(String, String)>,
}

impl Client {
    /// A client for `url`. Non-2xx statuses come back as replies (their body goes into the
    /// error); a loopback `url` is never sent through a proxy the environment names.
    pub(crate) fn new(url: &str, timeout: Duration, headers: Vec<(String, String)>) -> Client {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .user_agent(format!("graft/{}", env!("CARGO_PKG_VERSION")));
        if is_loopback(url) {
            config = config.proxy(None);
        }
        Client {
            agent: config.build().into(),
            timeout,
            headers,
        }
    }
}

/// Whether `url`'s host is `localhost`, `127.x.x.x` or `[::1]`.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or_default().trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// POSTs `body` to `url` with `headers`; the reply's JSON, or what went wrong, naming the URL.
pub(crate) fn post_json(client: &Client, url: &str, body: &Value) -> Result<Value, String> {
    let failed = |e: ureq::Error| match e {
        ureq::Error::Timeout(_) => format!(
            "POST {url}: no complete reply within timeout_s = {}",
            client.timeout.as_secs_f64()
        ),
        e => format!("POST {url}: {e}"),
    };
    let mut req = client.agent.post(url).header("content-type", "application/json");
    for (k, v) in &client.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut resp = req.send(body.to_string()).map_err(failed)?;
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(failed)?;
    if !status.is_success() {
        return Err(format!("POST {url}: HTTP {status}: {}", short(&text)));
    }
    serde_json::from_str(&text)
        .map_err(|e| format!("POST {url}: the reply is not JSON ({e}): {}", short(&text)))
}

/// The options `headers` (a table of strings) and `api_key_env` (the name of a variable whose
/// value goes in `Authorization: Bearer ...`; it must be set).
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

/// `http`: POSTs `{"samples": [...]}` (see the [module docs](self)) to `url` and reads
/// `{"rewards": [...]}`, one per sample, in order.
///
/// Options: `url` (required); `headers`, a table of strings; `api_key_env`, a variable holding a
/// bearer token; `timeout_s`, the time one batch's request may take (default 60).
pub struct HttpReward {
    url: String,
    client: Client,
}

impl HttpReward {
    /// Reads the options `url`, `headers`, `api_key_env` and `timeout_s`.
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let url = opts
            .string("url")?
            .ok_or_else(|| opts.err("url", "is required (e.g. \"http://127.0.0.1:9000/score\")"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(opts.err("url", format!("must start with http:// or https://, not `{url}`")));
        }
        let timeout = seconds(opts, "timeout_s", 60.0)?;
        Ok(HttpReward {
            client: Client::new(&url, timeout, headers(opts)?),
            url,
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
        if samples.is_empty() {
            return Vec::new();
        }
        let body = json!({"samples": samples.iter().map(sample_json).collect::<Vec<_>>()});
        let reply = match post_json(&self.client, &self.url, &body) {
            Ok(v) => v,
            Err(e) => return all_fail("http", samples.len(), &e),
        };
        let Some(list) = reply.get("rewards").and_then(Value::as_array) else {
            let e = format!(
                "{} answered {}; expected {{\"rewards\": [...]}}",
                self.url,
                short(&reply.to_string())
            );
            return all_fail("http", samples.len(), &e);
        };
        if list.len() != samples.len() {
            let e = format!(
                "{} answered {} rewards for {} samples",
                self.url,
                list.len(),
                samples.len()
            );
            return all_fail("http", samples.len(), &e);
        }
        list.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Null => Err(RewardError::new(
                    "http",
                    format!(
                        "{} answered null for sample {} of {}",
                        self.url,
                        i + 1,
                        samples.len()
                    ),
                )),
                v => parse_answer("http", &self.url, v),
            })
            .collect()
    }
}

/// A piece of a `judge` prompt template.
#[derive(Clone, Debug, PartialEq)]
enum Piece {
    /// Text as it is.
    Text(String),
    /// `{name}`: the prompt, the completion, or a column.
    Field(String),
}

/// Splits a template into text and `{name}` fields (`name` of letters, digits and `_`). `{{` and
/// `}}` are literal braces; any other brace (a JSON example such as `{"score": 7}`) is text.
fn parse_template(t: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") || rest.starts_with("}}") {
            text.push(c);
            rest = &rest[2..];
            continue;
        }
        if c == '{'
            && let Some(j) = rest[1..].find('}')
            && j > 0
            && rest[1..1 + j].chars().all(|c| c.is_alphanumeric() || c == '_')
        {
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Field(rest[1..1 + j].to_string()));
            rest = &rest[j + 2..];
            continue;
        }
        text.push(c);
        rest = &rest[c.len_utf8()..];
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

/// The first number in `text`: `8`, `-0.5`, `.5`; `7/10` gives 7.
pub(crate) fn first_number(text: &str) -> Option<f64> {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    let re = RE.get_or_init(|| regex::Regex::new(r"-?(?:\d+(?:\.\d+)?|\.\d+)").expect("valid regex"));
    re.find(text).and_then(|m| m.as_str().parse().ok())
}

/// `base` (`http://host:8000/v1`) joined with `path` (`chat/completions`); a `base` that already
/// ends with `path` is the endpoint itself.
pub(crate) fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(&format!("/{path}")) {
        base.to_string()
    } else {
        format!("{base}/{path}")
    }
}

/// What an OpenAI-compatible chat endpoint answered: `choices[0].message.content`, its
/// `refusal` (if any), and the reply's `usage` and `model`.
pub(crate) struct ChatReply {
    pub(crate) content: String,
    pub(crate) refusal: Option<String>,
    pub(crate) usage: Option<Value>,
    pub(crate) model: Option<String>,
}

/// POSTs a chat request `body` to `url` (`.../chat/completions`) and reads the first choice. A
/// reply without `choices[0].message.content` (and no refusal) is an error quoting it.
pub(crate) fn chat_completion(client: &Client, url: &str, body: &Value) -> Result<ChatReply, String> {
    let reply = post_json(client, url, body)?;
    let message = &reply["choices"][0]["message"];
    let refusal = message["refusal"].as_str().map(str::to_string);
    let content = match (message["content"].as_str(), &refusal) {
        (Some(c), _) => c.to_string(),
        (None, Some(_)) => String::new(),
        (None, None) => {
            return Err(format!(
                "{url} answered {}; expected choices[0].message.content",
                short(&reply.to_string())
            ));
        }
    };
    Ok(ChatReply {
        content,
        refusal,
        usage: reply.get("usage").cloned(),
        model: reply["model"].as_str().map(str::to_string),
    })
}

/// `f(i)` for every `i < n`, at most `parallel` at a time on scoped threads, in order. A call
/// that panicked gives `panicked`.
pub(crate) fn parallel_map<T: Send>(
    n: usize,
    parallel: usize,
    f: impl Fn(usize) -> T + Sync,
    panicked: impl Fn() -> T,
) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1).min(n) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = f(i);
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(&panicked)
        })
        .collect()
}

/// `judge`: asks an OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`) to grade
/// each completion, and scores the first number of `choices[0].message.content` divided by
/// `scale` ("8" with the default scale 10 scores 0.8). A reply without a number is an error for
/// that sample quoting the reply.
///
/// Options: `base_url` (required, e.g. `http://127.0.0.1:8000/v1`), `model` (required), `prompt`
/// (required: the user message, a template where `{prompt}`, `{completion}` and `{column}` stand
/// for the row's values, `{{`/`}}` for literal braces; a placeholder that is none of these is an
/// error naming it), `system` (a system message), `scale` (10), `max_tokens` (16), `temperature`
/// (0), `parallel` requests at a time (4), `headers`, `api_key_env`, and `timeout_s` per request
/// (60).
pub struct JudgeReward {
    url: String,
    model: String,
    template: Vec<Piece>,
    system: Option<String>,
    max_tokens: u64,
    temperature: f64,
    scale: f64,
    parallel: usize,
    client: Client,
}

impl JudgeReward {
    /// Reads the options `base_url`, `model`, `prompt`, `system`, `scale`, `max_tokens`,
    /// `temperature`, `parallel`, `headers`, `api_key_env` and `timeout_s`.
    pub(crate) fn from_options(opts: &mut Options<'_>) -> Result<Self, String> {
        let base = opts
            .string("base_url")?
            .ok_or_else(|| opts.err("base_url", "is required (e.g. \"http://127.0.0.1:8000/v1\")"))?;
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(opts.err(
                "base_url",
                format!("must start with http:// or https://, not `{base}`"),
            ));
        }
        let url = endpoint(&base, "chat/completions");
        let model = opts
            .string("model")?
            .ok_or_else(|| opts.err("model", "is required"))?;
        let template = opts.string("prompt")?.ok_or_else(|| {
            opts.err(
                "prompt",
                "is required: the judge's instructions with {prompt} and {completion} (and {column} for any column)",
            )
        })?;
        let template = parse_template(&template);
        if !template
            .iter()
            .any(|p| matches!(p, Piece::Field(f) if f == "completion"))
        {
            return Err(opts.err("prompt", "must contain {completion}, the text to grade"));
        }
        Ok(JudgeReward {
            model,
            template,
            system: opts.string("system")?,
            max_tokens: whole(opts, "max_tokens", 16)?,
            temperature: opts.number("temperature", false)?.unwrap_or(0.0),
            scale: opts.number("scale", true)?.unwrap_or(10.0),
            parallel: usize::try_from(whole(opts, "parallel", 4)?).unwrap_or(usize::MAX),
            client: Client::new(&url, seconds(opts, "timeout_s", 60.0)?, headers(opts)?),
            url,
        })
    }

    /// The judge's user message for one sample. A placeholder that is neither `prompt`,
    /// `completion` nor a column of the row, or a `null` column, is an error naming it. Values
    /// are inserted once: a completion that contains `{answer}` is not filled in.
    fn render(&self, s: &Sample) -> Result<String, RewardError> {
        let mut out = String::new();
        for piece in &self.template {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) if f == "prompt" => out.push_str(s.prompt),
                Piece::Field(f) if f == "completion" => out.push_str(s.completion),
                Piece::Field(col) => match s.columns.get(col) {
                    Some(Value::String(v)) => out.push_str(v),
                    Some(Value::Null) => {
                        return Err(RewardError::new(
                            "judge",
                            format!("the prompt's placeholder {{{col}}}: column `{col}` is null in this row"),
                        ));
                    }
                    Some(v) => out.push_str(&v.to_string()),
                    None => {
                        let mut known: Vec<&str> = s.columns.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        return Err(RewardError::new(
                            "judge",
                            format!(
                                "the prompt's placeholder {{{col}}} is neither prompt, completion nor a column of \
                                 this row (columns: {}; write {{{{ and }}}} for literal braces)",
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                },
            }
        }
        Ok(out)
    }

    /// One chat request for one sample, and its score.
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
        let reply =
            chat_completion(&self.client, &self.url, &body).map_err(|e| RewardError::new("judge", e))?;
        let text = reply.content.as_str();
        let n = first_number(text).ok_or_else(|| {
            RewardError::new(
                "judge",
                format!("the judge's reply has no number: {:?}", short(text)),
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
        parallel_map(
            samples.len(),
            self.parallel,
            |i| self.grade(&samples[i]),
            || {
                Err(RewardError::new(
                    "judge",
                    "not graded (a grading thread panicked)",
                ))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_fns::from_config;
    use serde_json::Map;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};

    fn sample<'a>(completion: &'a str, columns: &'a Map<String, Value>) -> Sample<'a> {
        Sample {
            prompt: "What is 2+2?",
            completion,
            columns,
        }
    }

    fn cols(v: Value) -> Map<String, Value> {
        crate::reward_fns::tests::cols(v)
    }

    /// The error message of a result that must be an error.
    fn err(r: &Result<f64, RewardError>) -> String {
        match r {
            Ok(x) => panic!("expected an error, got Ok({x})"),
            Err(e) => e.to_string(),
        }
    }

    /// A fresh directory for one test's scripts and logs.
    fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("graft-ext-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The process ids a script wrote to `file`, one a line.
    fn pids(file: &Path) -> Vec<u32> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect()
    }

    /// Whether process `pid` still runs (a zombie counts as gone).
    fn alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => {
                let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
                !matches!(state, Some(Some('Z' | 'X')))
            }
        }
    }

    /// Waits up to 2 s for `pid` to be gone.
    fn gone(pid: u32) -> bool {
        let t0 = Instant::now();
        while alive(pid) {
            if t0.elapsed() > Duration::from_secs(2) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// A `command` reward running `python3 script args...`, the script written to `dir`.
    fn python(dir: &Path, script: &str, args: &[&Path], extra: Value) -> Box<dyn RewardFn> {
        let path = dir.join("score.py");
        std::fs::write(&path, script).unwrap();
        let mut argv = vec![json!("python3"), json!(path.to_str().unwrap())];
        argv.extend(args.iter().map(|a| json!(a.to_str().unwrap())));
        let mut opts = json!({"command": argv});
        if let (Value::Object(o), Value::Object(e)) = (&mut opts, extra) {
            o.extend(e);
        }
        from_config("command", &opts).unwrap()
    }

    #[test]
    fn command_scores_batches_in_one_lazily_started_process_killed_on_drop() {
        let dir = scratch("batches");
        let (pid_file, log) = (dir.join("pids"), dir.join("log"));
        let script = "import sys, json, os\n\
                      open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n\
                      n = 0\n\
                      for line in sys.stdin:\n    \
                          open(sys.argv[2], 'a').write(line)\n    \
                          s = json.loads(line)\n    \
                          n += 1\n    \
                          c = s['completion']\n    \
                          if c == 'err': print(json.dumps({'error': 'no test column'}), flush=True)\n    \
                          elif c == 'bare': print(' 0.25 ', flush=True)\n    \
                          elif c == 'noreward': print(json.dumps({'score': 1}), flush=True)\n    \
                          elif c == 'textreward': print(json.dumps({'reward': 'high'}), flush=True)\n    \
                          else: print(json.dumps({'reward': n * 10 + len(c)}), flush=True)\n";
        let f = python(&dir, script, &[&pid_file, &log], json!({}));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pid_file.exists(), "started before the first batch");
        let c = cols(json!({"answer": "4", "id": 7}));
        let got = f.score_batch(&[
            sample("abc", &c),
            sample("err", &c),
            sample("bare", &c),
            sample("noreward", &c),
            sample("textreward", &c),
        ]);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Ok(13.0));
        let shown = format!("`python3 {}", dir.join("score.py").display());
        let e = err(&got[1]);
        assert!(e.starts_with("command: `python3 ") && e.contains(&shown), "{e}");
        assert!(e.ends_with("says: no test column"), "{e}");
        assert_eq!(got[2], Ok(0.25));
        let e = err(&got[3]);
        assert!(e.contains(r#"answered {"score":1}; expected a number"#), "{e}");
        let e = err(&got[4]);
        assert!(e.contains(r#"answered {"reward":"high"}"#), "{e}");
        // What graft sent for the first sample, exactly.
        let first: Value =
            serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(
            first,
            json!({"prompt": "What is 2+2?", "completion": "abc", "columns": {"answer": "4", "id": 7}})
        );
        // The same process answers the next batch: its counter goes on from 5.
        assert_eq!(f.score_batch(&[sample("xy", &c)]), vec![Ok(62.0)]);
        assert_eq!(f.score(&sample("q", &c)), Ok(71.0));
        assert!(f.score_batch(&[]).is_empty());
        let started = pids(&pid_file);
        assert_eq!(started.len(), 1, "{started:?}");
        assert!(alive(started[0]));
        drop(f);
        assert!(
            gone(started[0]),
            "process {} outlived the reward function",
            started[0]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_that_dies_reports_exit_status_and_stderr_then_restarts() {
        let dir = scratch("dies");
        let pid_file = dir.join("pids");
        let script = "import sys, json, os\n\
                      open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n\
                      for line in sys.stdin:\n    \
                          c = json.loads(line)['completion']\n    \
                          if c == 'crash':\n        \
                              sys.stderr.write('Traceback (most recent call last)\\nKeyError: answer\\n')\n        \
                              sys.exit(3)\n    \
                          print(len(c), flush=True)\n";
        let f = python(&dir, script, &[&pid_file], json!({}));
        let c = Map::new();
        let got = f.score_batch(&[sample("ok", &c), sample("crash", &c), sample("later", &c)]);
        // The answer given before the crash is kept; the rest fail with the reason.
        assert_eq!(got[0], Ok(2.0));
        for r in &got[1..] {
            let e = err(r);
            assert!(
                e.contains("exited after answering 1 of 3 samples (exit status: 3)"),
                "{e}"
            );
            assert!(
                e.contains("its stderr ends: Traceback (most recent call last) | KeyError: answer"),
                "{e}"
            );
            assert!(e.contains("score.py"), "{e}");
        }
        // A fresh process answers the next batch.
        assert_eq!(f.score_batch(&[sample("abcd", &c)]), vec![Ok(4.0)]);
        let started = pids(&pid_file);
        assert_eq!(started.len(), 2, "{started:?}");
        assert_ne!(started[0], started[1]);
        assert!(!alive(started[0]));
        drop(f);
        assert!(gone(started[1]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_restarts_a_process_that_exited_between_batches() {
        let dir = scratch("oneshot");
        let pid_file = dir.join("pids");
        // Answers one line, then exits: every batch needs a new process.
        let script = "import sys, os\n\
                      open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n\
                      sys.stdin.readline()\n\
                      print(1, flush=True)\n";
        let f = python(&dir, script, &[&pid_file], json!({}));
        let c = Map::new();
        for _ in 0..3 {
            assert_eq!(f.score(&sample("a", &c)), Ok(1.0));
        }
        assert_eq!(pids(&pid_file).len(), 3);
        // A process that dies on the batch's first sample is not retried forever.
        let got = f.score_batch(&[sample("a", &c), sample("b", &c)]);
        assert_eq!(got[0], Ok(1.0));
        assert!(
            err(&got[1]).contains("exited after answering 1 of 2 samples"),
            "{got:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_answering_garbage_names_the_line() {
        let f = from_config(
            "command",
            &json!({"command": "while read l; do echo 'Traceback: oops'; done"}),
        )
        .unwrap();
        let c = Map::new();
        let got = f.score_batch(&[sample("a", &c), sample("b", &c)]);
        for r in &got {
            let e = err(r);
            assert!(e.starts_with("command: `while read l; do echo 'Traceback: oops'; done` answered sample 1 of 2 with a line that is not JSON"), "{e}");
            assert!(e.ends_with(": Traceback: oops"), "{e}");
        }
        // Answering more lines than samples puts the process out of step.
        let f = from_config(
            "command",
            &json!({"command": "while read l; do echo 1; echo 2; done"}),
        )
        .unwrap();
        assert_eq!(f.score(&sample("a", &c)), Ok(1.0));
        std::thread::sleep(Duration::from_millis(300));
        let e = err(&f.score(&sample("b", &c)));
        assert!(
            e.contains("answered more lines than it was sent samples; the extra line: 2"),
            "{e}"
        );
        assert_eq!(
            f.score(&sample("c", &c)),
            Ok(1.0),
            "a fresh process after the mismatch"
        );
    }

    #[test]
    fn command_that_hangs_times_out_and_is_killed() {
        let dir = scratch("hangs");
        let pid_file = dir.join("pids");
        let script = "import sys, os, time\n\
                      open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n\
                      for line in sys.stdin:\n    \
                          if 'slow' in line: time.sleep(30)\n    \
                          print(1, flush=True)\n";
        let f = python(&dir, script, &[&pid_file], json!({"timeout_s": 0.4}));
        let c = Map::new();
        let t0 = Instant::now();
        let got = f.score_batch(&[sample("fast", &c), sample("slow", &c), sample("fast", &c)]);
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(got[0], Ok(1.0));
        for r in &got[1..] {
            let e = err(r);
            assert!(e.contains("score.py"), "{e}");
            assert!(
                e.contains("answered 1 of 3 samples within timeout_s = 0.4"),
                "{e}"
            );
        }
        let first = pids(&pid_file)[0];
        assert!(gone(first), "the hung process was not killed");
        assert_eq!(
            f.score(&sample("fast", &c)),
            Ok(1.0),
            "a fresh process after the timeout"
        );
        drop(f);

        // A process that never reads its input: a batch bigger than a pipe holds still times out,
        // and the whole process group (the shell's background child too) is killed.
        let sleeper = dir.join("sleeper");
        let cmd = format!("sleep 30 & echo $! > {}; wait", sleeper.display());
        let f = from_config("command", &json!({"command": cmd, "timeout_s": 0.4})).unwrap();
        let big = "x".repeat(300_000);
        let t0 = Instant::now();
        let got = f.score_batch(&[sample(&big, &c), sample(&big, &c)]);
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(
            err(&got[0]).contains("answered 0 of 2 samples within timeout_s = 0.4"),
            "{got:?}"
        );
        let sleep_pid = pids(&sleeper)[0];
        assert!(gone(sleep_pid), "the command's child {sleep_pid} survived");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_options_and_start_failures() {
        for (args, want) in [
            (json!({}), "command: option `command` is required"),
            (
                json!({"command": []}),
                "command: option `command` must be a non-empty string or list",
            ),
            (
                json!({"command": [""]}),
                "command: option `command` must be a non-empty string or list",
            ),
            (
                json!({"command": ["python3", 1]}),
                "command: option `command` must be a non-empty string or list",
            ),
            (
                json!({"command": "  "}),
                "command: option `command` must be a non-empty string or list",
            ),
            (
                json!({"command": "cat", "timeout_s": 0}),
                "command: option `timeout_s` must be a number > 0",
            ),
            (
                json!({"command": "cat", "cwd": 3}),
                "command: option `cwd` must be a string",
            ),
            (
                json!({"command": "cat", "timeout": 3}),
                "command: unknown option `timeout` (known: command, cwd, timeout_s)",
            ),
        ] {
            let e = from_config("command", &args).err().unwrap();
            assert!(e.starts_with(want), "{args}: {e}");
        }
        let c = Map::new();
        let f = from_config("command", &json!({"command": ["/nonexistent/scorer", "--x"]})).unwrap();
        let e = err(&f.score(&sample("a", &c)));
        assert!(
            e.starts_with("command: cannot start `/nonexistent/scorer --x`: "),
            "{e}"
        );
        // `cwd` is where the process runs.
        let dir = scratch("cwd");
        let dir = dir.canonicalize().unwrap();
        let script = format!(
            "while read l; do if [ \"$(pwd -P)\" = '{}' ]; then echo 1; else echo 0; fi; done",
            dir.display()
        );
        let f = from_config(
            "command",
            &json!({"command": script, "cwd": dir.to_str().unwrap()}),
        )
        .unwrap();
        assert_eq!(f.score(&sample("a", &c)), Ok(1.0));
        let f = from_config("command", &json!({"command": script})).unwrap();
        assert_eq!(f.score(&sample("a", &c)), Ok(0.0));
        let f = from_config("command", &json!({"command": "cat", "cwd": "/nonexistent/dir"})).unwrap();
        let e = err(&f.score(&sample("a", &c)));
        assert!(
            e.starts_with("command: cannot start `cat` in /nonexistent/dir: "),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One HTTP request as the test server saw it.
    #[derive(Debug)]
    struct Request {
        method: String,
        path: String,
        /// Lower-cased names.
        headers: Vec<(String, String)>,
        body: Value,
    }

    impl Request {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Reads one request (headers, then `content-length` bytes of JSON body) from `c`.
    fn read_request(c: &mut TcpStream) -> Request {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        let p = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let k = c.read(&mut chunk).unwrap();
            assert!(k > 0, "connection closed inside the headers");
            buf.extend_from_slice(&chunk[..k]);
        };
        let head = String::from_utf8(buf[..p].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap().split(' ');
        let (method, path) = (
            first.next().unwrap().to_string(),
            first.next().unwrap().to_string(),
        );
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_lowercase(), v.trim().to_string())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .expect("a content-length");
        while buf.len() < p + 4 + len {
            let k = c.read(&mut chunk).unwrap();
            assert!(k > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..k]);
        }
        let body = serde_json::from_slice(&buf[p + 4..p + 4 + len]).unwrap();
        Request {
            method,
            path,
            headers,
            body,
        }
    }

    fn respond(c: &mut TcpStream, status: u16, text: &str) {
        let _ = write!(
            c,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        );
    }

    /// An HTTP server on 127.0.0.1 answering each request with `reply(request)` (status, body
    /// text) for 5 s or `n` requests; its base URL and, when joined, the requests it received.
    fn server(
        n: usize,
        reply: impl Fn(&Request) -> (u16, String) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<Vec<Request>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut seen = Vec::new();
            while seen.len() < n && t0.elapsed() < Duration::from_secs(5) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let req = read_request(&mut c);
                        let (status, text) = reply(&req);
                        respond(&mut c, status, &text);
                        seen.push(req);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            seen
        });
        (url, h)
    }

    #[test]
    fn http_posts_the_batch_and_reads_one_reward_per_sample() {
        let (url, h) = server(1, |_| {
            (
                200,
                r#"{"rewards": [0.5, {"reward": 1}, null, {"error": "no test column"}]}"#.into(),
            )
        });
        let url = format!("{url}/score");
        let f = from_config(
            "http",
            &json!({"url": url, "headers": {"X-Team": "rl"}, "api_key_env": "PATH"}),
        )
        .unwrap();
        let c = cols(json!({"answer": "4", "n": [1, 2]}));
        let got = f.score_batch(&[sample("a", &c), sample("b", &c), sample("c", &c), sample("d", &c)]);
        assert_eq!(got[0], Ok(0.5));
        assert_eq!(got[1], Ok(1.0));
        assert_eq!(
            got[2].clone().unwrap_err().to_string(),
            format!("http: {url} answered null for sample 3 of 4")
        );
        assert_eq!(
            got[3].clone().unwrap_err().to_string(),
            format!("http: {url} says: no test column")
        );
        let reqs = h.join().unwrap();
        assert_eq!(reqs.len(), 1, "one request for the whole batch");
        let r = &reqs[0];
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/score"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-team"), Some("rl"));
        // PATH is set wherever the tests run; it stands for a key variable.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(r.header("authorization"), Some(format!("Bearer {path}").as_str()));
        let samples: Vec<Value> = ["a", "b", "c", "d"]
            .iter()
            .map(|x| json!({"prompt": "What is 2+2?", "completion": x, "columns": {"answer": "4", "n": [1, 2]}}))
            .collect();
        assert_eq!(r.body, json!({ "samples": samples }));
    }

    #[test]
    fn http_failures_name_the_url_and_fail_the_batch() {
        let (url, h) = server(4, |r| {
            match r.body["samples"][0]["completion"].as_str().unwrap() {
                "500" => (500, r#"{"detail": "model not loaded"}"#.into()),
                "html" => (200, "<html>oops</html>".into()),
                "count" => (200, r#"{"rewards": [1.0]}"#.into()),
                _ => (200, r#"{"scores": [1.0, 2.0]}"#.into()),
            }
        });
        let f = from_config("http", &json!({"url": url})).unwrap();
        let c = Map::new();
        let errors = |first: &str| -> Vec<String> {
            let got = f.score_batch(&[sample(first, &c), sample("x", &c)]);
            assert_eq!(got.len(), 2);
            got.iter().map(|r| r.clone().unwrap_err().to_string()).collect()
        };
        let e = errors("500");
        assert_eq!(e[0], e[1]);
        assert!(e[0].starts_with(&format!("http: POST {url}: HTTP 500")), "{e:?}");
        assert!(e[0].contains("model not loaded"), "{e:?}");
        let e = errors("html");
        assert!(
            e[0].starts_with(&format!("http: POST {url}: the reply is not JSON"))
                && e[0].ends_with("<html>oops</html>"),
            "{e:?}"
        );
        let e = errors("count");
        assert_eq!(e[1], format!("http: {url} answered 1 rewards for 2 samples"));
        let e = errors("other");
        assert_eq!(
            e[0],
            format!(r#"http: {url} answered {{"scores":[1.0,2.0]}}; expected {{"rewards": [...]}}"#)
        );
        assert_eq!(h.join().unwrap().len(), 4);

        // Nobody listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/score");
        let f = from_config("http", &json!({"url": url})).unwrap();
        let e = f.score(&sample("a", &c)).unwrap_err().to_string();
        assert!(e.starts_with(&format!("http: POST {url}: ")), "{e}");

        // A server that never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/score", l.local_addr().unwrap());
        let hold = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(1));
            drop(c);
        });
        let f = from_config("http", &json!({"url": url, "timeout_s": 0.3})).unwrap();
        let t0 = Instant::now();
        let e = f.score(&sample("a", &c)).unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_millis(1500), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            format!("http: POST {url}: no complete reply within timeout_s = 0.3")
        );
        hold.join().unwrap();
    }

    #[test]
    fn http_options_are_checked() {
        for (args, want) in [
            (json!({}), "http: option `url` is required"),
            (
                json!({"url": "127.0.0.1:9/score"}),
                "http: option `url` must start with http:// or https://",
            ),
            (
                json!({"url": "http://h/s", "headers": {"x": 1}}),
                "http: option `headers` values must be strings; `x` is 1",
            ),
            (
                json!({"url": "http://h/s", "headers": "x"}),
                "http: option `headers` must be a table of strings",
            ),
            (
                json!({"url": "http://h/s", "api_key_env": "GRAFT_TEST_NEVER_SET_9F2C"}),
                "http: option `api_key_env` names $GRAFT_TEST_NEVER_SET_9F2C, which is not set",
            ),
            (
                json!({"url": "http://h/s", "timeout_s": -1}),
                "http: option `timeout_s` must be a number > 0",
            ),
        ] {
            let e = from_config("http", &args).err().unwrap();
            assert!(e.starts_with(want), "{args}: {e}");
        }
        assert!(is_loopback("http://127.0.0.1:8000/v1"));
        assert!(is_loopback("http://localhost/score"));
        assert!(is_loopback("http://[::1]:9000/score"));
        assert!(!is_loopback("https://api.example.com/v1"));
        assert!(!is_loopback("http://10.0.0.1:80/"));
    }

    /// The chat reply the judge server sends, with `content` as the judge's text.
    fn chat(content: &str) -> String {
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).to_string()
    }

    /// A `judge` reward built directly, to reach its template.
    fn judge(args: Value) -> JudgeReward {
        JudgeReward::from_options(&mut Options::new("judge", &args).unwrap()).unwrap()
    }

    #[test]
    fn judge_sends_one_chat_request_per_sample_and_scales_the_first_number() {
        let long = format!("I refuse to grade this. {}", "Really. ".repeat(100));
        let long2 = long.clone();
        let (url, h) = server(3, move |r| {
            let user = r.body["messages"][1]["content"].as_str().unwrap();
            let text = if user.contains("A: good") {
                "Score: 8/10".to_string()
            } else if user.contains("A: meh") {
                "I'd give it 3.5 out of 10 (not 4)".to_string()
            } else {
                long2.clone()
            };
            (200, chat(&text))
        });
        let f = from_config(
            "judge",
            &json!({
                "base_url": format!("{url}/v1/"),
                "model": "judge-model",
                "system": "You grade answers.",
                "prompt": "Q: {prompt}\nA: {completion}\nScore 0-10:",
                "parallel": 1,
                "api_key_env": "PATH",
            }),
        )
        .unwrap();
        let c = Map::new();
        let got = f.score_batch(&[sample("good", &c), sample("meh", &c), sample("bad", &c)]);
        assert_eq!(got[0], Ok(0.8));
        assert_eq!(got[1], Ok(0.35));
        let e = got[2].clone().unwrap_err().to_string();
        assert!(
            e.starts_with("judge: the judge's reply has no number: \"I refuse to grade this. Really."),
            "{e}"
        );
        assert!(e.ends_with("…\"") && e.chars().count() < 300, "{e}");
        let reqs = h.join().unwrap();
        assert_eq!(reqs.len(), 3);
        let r = &reqs[0];
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        let path = std::env::var("PATH").unwrap();
        assert_eq!(r.header("authorization"), Some(format!("Bearer {path}").as_str()));
        assert_eq!(
            r.body,
            json!({
                "model": "judge-model",
                "messages": [
                    {"role": "system", "content": "You grade answers."},
                    {"role": "user", "content": "Q: What is 2+2?\nA: good\nScore 0-10:"},
                ],
                "max_tokens": 16,
                "temperature": 0.0,
            })
        );

        // Other options reach the request; a full endpoint URL is accepted too.
        let (url, h) = server(1, |_| (200, chat("7")));
        let f = from_config(
            "judge",
            &json!({
                "base_url": format!("{url}/v1/chat/completions"),
                "model": "m",
                "prompt": "{completion}",
                "scale": 100,
                "max_tokens": 4,
                "temperature": 0.5,
                "headers": {"x-judge": "yes"},
            }),
        )
        .unwrap();
        assert_eq!(f.score(&sample("x", &c)), Ok(0.07));
        let r = &h.join().unwrap()[0];
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.header("x-judge"), Some("yes"));
        assert_eq!(r.header("authorization"), None);
        assert_eq!(r.body["messages"], json!([{"role": "user", "content": "x"}]));
        assert_eq!(
            (r.body["max_tokens"].clone(), r.body["temperature"].clone()),
            (json!(4), json!(0.5))
        );
    }

    #[test]
    fn judge_template_fills_values_once_and_names_unknown_placeholders() {
        let j = judge(json!({
            "base_url": "http://127.0.0.1:9/v1",
            "model": "m",
            "prompt": "Q: {prompt}\nA: {completion}\nRef: {answer} (id {id}, {tags})\nReply {{\"score\": n}} or {\"score\": n}, {{completion}}.",
        }));
        let c = cols(json!({"answer": "4", "id": 17, "tags": ["easy"]}));
        // A completion that writes a placeholder gets it as text, not the reference.
        let got = j.render(&sample("{answer} {prompt}", &c)).unwrap();
        assert_eq!(
            got,
            "Q: What is 2+2?\nA: {answer} {prompt}\nRef: 4 (id 17, [\"easy\"])\nReply {\"score\": n} or {\"score\": n}, {completion}."
        );
        // An unknown placeholder names itself, before any request is made.
        let j = judge(
            json!({"base_url": "http://127.0.0.1:9/v1", "model": "m", "prompt": "{completion} vs {solution}"}),
        );
        let e = j.score(&sample("x", &c)).unwrap_err().to_string();
        assert!(
            e.starts_with("judge: the prompt's placeholder {solution} is neither prompt, completion nor a column of this row (columns: answer, id, tags;"),
            "{e}"
        );
        let e = j
            .score(&sample("x", &cols(json!({"solution": null}))))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "judge: the prompt's placeholder {solution}: column `solution` is null in this row"
        );
        assert_eq!(
            parse_template("a{b}{{c}}{ d }{}{é_1}}"),
            vec![
                Piece::Text("a".into()),
                Piece::Field("b".into()),
                Piece::Text("{c}{ d }{}".into()),
                Piece::Field("é_1".into()),
                Piece::Text("}".into()),
            ]
        );
        assert_eq!(first_number("Score: 8/10"), Some(8.0));
        assert_eq!(first_number("-0.5 then 3"), Some(-0.5));
        assert_eq!(first_number("about .5"), Some(0.5));
        assert_eq!(first_number("ten"), None);
    }

    #[test]
    fn judge_sends_parallel_requests() {
        // Holds every request until 4 are open at once, then answers each with how many were.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut open = Vec::new();
            while open.len() < 4 && t0.elapsed() < Duration::from_secs(2) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let r = read_request(&mut c);
                        open.push((c, r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            let n = open.len();
            for (c, _) in &mut open {
                respond(c, 200, &chat(&format!("{n}")));
            }
            n
        });
        let f = from_config(
            "judge",
            &json!({"base_url": url, "model": "m", "prompt": "{completion}", "parallel": 4}),
        )
        .unwrap();
        let c = Map::new();
        let t0 = Instant::now();
        let got = f.score_batch(&[sample("a", &c), sample("b", &c), sample("c", &c), sample("d", &c)]);
        assert_eq!(got, vec![Ok(0.4); 4], "requests were not sent 4 at a time");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(h.join().unwrap(), 4);
    }

    #[test]
    fn judge_failures_name_the_url() {
        let (url, h) = server(2, |r| match r.body["messages"][0]["content"].as_str().unwrap() {
            "down" => (503, r#"{"error": {"message": "overloaded"}}"#.into()),
            _ => (200, r#"{"choices": []}"#.into()),
        });
        let f = from_config(
            "judge",
            &json!({"base_url": format!("{url}/v1"), "model": "m", "prompt": "{completion}", "parallel": 1}),
        )
        .unwrap();
        let c = Map::new();
        let got = f.score_batch(&[sample("down", &c), sample("empty", &c)]);
        let e = got[0].clone().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("judge: POST {url}/v1/chat/completions: HTTP 503"))
                && e.contains("overloaded"),
            "{e}"
        );
        let e = got[1].clone().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                r#"judge: {url}/v1/chat/completions answered {{"choices":[]}}; expected choices[0].message.content"#
            )
        );
        assert_eq!(h.join().unwrap().len(), 2);
        for (args, want) in [
            (
                json!({"model": "m", "prompt": "{completion}"}),
                "judge: option `base_url` is required",
            ),
            (
                json!({"base_url": "http://h/v1", "prompt": "{completion}"}),
                "judge: option `model` is required",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m"}),
                "judge: option `prompt` is required",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{prompt}"}),
                "judge: option `prompt` must contain {completion}",
            ),
            (
                json!({"base_url": "h/v1", "model": "m", "prompt": "{completion}"}),
                "judge: option `base_url` must start with http://",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{completion}", "parallel": 0}),
                "judge: option `parallel` must be a number > 0",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{completion}", "parallel": 1.5}),
                "judge: option `parallel` must be a whole number >= 1, not 1.5",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{completion}", "max_tokens": 2.5}),
                "judge: option `max_tokens` must be a whole number",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{completion}", "scale": 0}),
                "judge: option `scale` must be a number > 0",
            ),
            (
                json!({"base_url": "http://h/v1", "model": "m", "prompt": "{completion}", "temp": 1}),
                "judge: unknown option `temp`",
            ),
        ] {
            let e = from_config("judge", &args).err().unwrap();
            assert!(e.starts_with(want), "{args}: {e}");
        }
    }
}
