//! OpenAI's fine-tuning graders (the `grader` object of a reinforcement fine-tuning job) as
//! graft reward functions: [`grader_from_json`] validates one and builds a [`RewardFn`];
//! [`run_grader`] grades one sample as `POST /v1/fine_tuning/alpha/graders/run` does; in a
//! GRPO config, `[[rewards]] name = "openai_grader"` with option `grader` does the same.
//!
//! | `type` | scores | fields besides `type`, `name` |
//! |---|---|---|
//! | `string_check` | 1 or 0: `eq`, `ne`, `like` (contains), `ilike` (contains, ignoring case) | `input`, `reference`, `operation` |
//! | `text_similarity` | a metric of [`super::similarity`], or `cosine` of two embeddings | `input`, `reference`, `evaluation_metric` |
//! | `score_model` | the number a chat model answers, clamped to `range` (`[0, 1]`) | `model`, `input` (messages), `range`, `sampling_params` |
//! | `label_model` | 1 if the label a chat model answers is one of `passing_labels` | `model`, `input`, `labels`, `passing_labels` |
//! | `python` | `grade(sample, item)` of `source`, in the `code_tests` sandbox | `source`, `image_tag` (accepted, ignored) |
//! | `multi` | `calculate_output` ([`super::formula`]) over its sub-graders' scores | `graders` (`{name: grader}`), `calculate_output` |
//!
//! Templates: `{{ sample.output_text }}` (the completion), `{{ sample.output_json.a.b }}` (the
//! completion parsed as JSON), `{{ item.a.b[0] }}` (the dataset row's columns) in `input`,
//! `reference` and message contents. Strings are inserted as they are, other values as JSON.
//! A field the sample or row lacks is an error naming it.
//!
//! Model graders and `cosine` call an OpenAI-compatible endpoint — OpenAI's JSON names none —
//! from [`GraderOptions::base_url`] (`POST {base_url}/chat/completions`, `.../embeddings`);
//! `python` graders run only with [`GraderOptions::allow_python`].
//!
//! Where graft differs from OpenAI: the score model's reply is read as `{"result": x}` or the
//! first number in it, the label model's as `{"result": "label"}`, the bare label, or the one
//! label it mentions (OpenAI constrains both with structured outputs, which graft does not
//! send, so any chat server works); `developer` messages are sent as `system`; `input_audio`
//! content is refused; `image_tag` is ignored (the python grader runs the local `python3`);
//! METEOR matches exact words only ([`super::similarity`]).

use super::code::run_sandboxed;
use super::external::{
    ChatReply, Client, chat_completion, endpoint, first_number, parallel_map, post_json, seconds, short,
    whole,
};
use super::formula::{self, Expr};
use super::similarity;
use super::{Options, RewardError, RewardFn, Sample};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a grader needs that OpenAI's JSON does not say: where model graders send requests, and
/// whether and how `python` graders run.
#[derive(Clone, Debug)]
pub struct GraderOptions {
    /// An OpenAI-compatible API base (`http://127.0.0.1:8000/v1`) for `score_model`,
    /// `label_model` and `cosine`; `None` refuses them.
    pub base_url: Option<String>,
    /// Sent as `Authorization: Bearer ...`.
    pub api_key: Option<String>,
    /// Whether `python` graders may run (in the sandbox); refused otherwise.
    pub allow_python: bool,
    /// The interpreter for `python` graders (`python3`).
    pub python: String,
    /// The wall-clock limit of one `grade` call (10 s).
    pub python_timeout: Duration,
    /// The address-space limit of a `python` grader (1024 MiB).
    pub python_memory_mb: u64,
    /// The limit of one HTTP request (60 s).
    pub timeout: Duration,
    /// The model `cosine` embeds with (`text-embedding-3-large`, as OpenAI documents).
    pub embeddings_model: String,
    /// How many samples of a batch are graded at once (4).
    pub parallel: usize,
}

impl Default for GraderOptions {
    fn default() -> Self {
        GraderOptions {
            base_url: None,
            api_key: None,
            allow_python: false,
            python: "python3".into(),
            python_timeout: Duration::from_secs(10),
            python_memory_mb: 1024,
            timeout: Duration::from_secs(60),
            embeddings_model: "text-embedding-3-large".into(),
            parallel: 4,
        }
    }
}

impl GraderOptions {
    /// The defaults with `base_url` from `$GRAFT_GRADER_BASE_URL` (else `$OPENAI_BASE_URL`) and
    /// `api_key` from `$GRAFT_GRADER_API_KEY` (else `$OPENAI_API_KEY`).
    pub fn from_env() -> Self {
        let var = |a: &str, b: &str| {
            std::env::var(a)
                .ok()
                .or_else(|| std::env::var(b).ok())
                .filter(|v| !v.is_empty())
        };
        GraderOptions {
            base_url: var("GRAFT_GRADER_BASE_URL", "OPENAI_BASE_URL"),
            api_key: var("GRAFT_GRADER_API_KEY", "OPENAI_API_KEY"),
            ..GraderOptions::default()
        }
    }
}

/// Validates `grader` (an OpenAI grader object) and builds the reward function that applies it
/// to each completion (`sample.output_text`) and the dataset row (`item`). Errors name the JSON
/// path: `grader.graders.acc.operation: expected one of eq, ne, like, ilike, got "equals"`.
pub fn grader_from_json(grader: &Value, opts: &GraderOptions) -> Result<Box<dyn RewardFn>, String> {
    Ok(Box::new(OpenAiGrader::new(grader, opts)?))
}

/// Grades one sample as `POST /v1/fine_tuning/alpha/graders/run` does and returns OpenAI's
/// response body (`reward`, `metadata`, `sub_rewards`, `model_grader_token_usage_per_model`).
/// `model_sample` is the output text, or `{"output_text", "output_json"}`; `item` the dataset
/// row (an object, or `null`). An invalid grader or sample is an error; a sample that cannot
/// be graded is a reward of 0 with the reason in `metadata.errors`, as OpenAI answers.
pub fn run_grader(
    grader: &Value,
    opts: &GraderOptions,
    model_sample: &Value,
    item: &Value,
) -> Result<Value, String> {
    let g = Grader::parse(grader, "grader", opts, true)?;
    let (output_text, output_json) = match model_sample {
        Value::String(s) => (s.clone(), serde_json::from_str(s).ok()),
        Value::Object(o) => {
            if let Some(k) = o
                .keys()
                .find(|k| !["output_text", "output_json"].contains(&k.as_str()))
            {
                return Err(format!(
                    "model_sample: unknown field `{k}` (known: output_text, output_json)"
                ));
            }
            let json = o.get("output_json").filter(|v| !v.is_null()).cloned();
            let text = match (o.get("output_text"), &json) {
                (Some(Value::String(s)), _) => s.clone(),
                (None, Some(j)) => j.to_string(),
                (Some(v), _) => return Err(format!("model_sample.output_text: expected a string, got {v}")),
                (None, None) => return Err("model_sample: expected output_text or output_json".into()),
            };
            let json = json.or_else(|| serde_json::from_str(&text).ok());
            (text, json)
        }
        v => return Err(format!("model_sample: expected a string or an object, got {v}")),
    };
    let item = match item {
        Value::Null => Value::Object(Map::new()),
        Value::Object(_) => item.clone(),
        v => return Err(format!("item: expected an object, got {v}")),
    };
    let ctx = Ctx {
        output_text: &output_text,
        output_json: output_json.as_ref(),
        item: &item,
    };
    let mut report = Report::default();
    let start = Instant::now();
    let result = g.grade(&ctx, opts, &mut report);
    let elapsed = start.elapsed().as_secs_f64();
    let mut errors = json!({
        "formula_parse_error": false,
        "invalid_variable_error": false,
        "model_grader_parse_error": false,
        "model_grader_refusal_error": false,
        "model_grader_server_error": false,
        "model_grader_server_error_details": null,
        "other_error": false,
        "python_grader_runtime_error": false,
        "python_grader_runtime_error_details": null,
        "python_grader_server_error": false,
        "python_grader_server_error_type": null,
        "sample_parse_error": false,
        "truncated_observation_error": false,
        "unresponsive_reward_error": false,
    });
    let reward = match result {
        Ok(r) => r,
        Err(e) => {
            errors[e.kind.flag()] = json!(true);
            match e.kind {
                ErrorKind::ModelServer => errors["model_grader_server_error_details"] = json!(e.message),
                ErrorKind::PythonRuntime => errors["python_grader_runtime_error_details"] = json!(e.message),
                ErrorKind::PythonServer => {
                    errors["python_grader_server_error_type"] = json!("sandbox_unavailable")
                }
                _ => {}
            }
            // graft's own words for every kind, which OpenAI's flags do not carry
            errors["graft_error_message"] = json!(e.message);
            0.0
        }
    };
    let total: u64 = report.usage.values().map(|u| u.total).sum();
    let per_model: Map<String, Value> = report
        .usage
        .iter()
        .map(|(m, u)| {
            (
                m.clone(),
                json!({"prompt_tokens": u.prompt, "completion_tokens": u.completion,
                       "total_tokens": u.total, "cached_tokens": u.cached}),
            )
        })
        .collect();
    let subs: Map<String, Value> = report
        .sub_rewards
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    Ok(json!({
        "reward": reward,
        "metadata": {
            "name": g.name,
            "type": g.kind.type_name(),
            "errors": errors,
            "execution_time": elapsed,
            "scores": subs,
            "token_usage": if report.usage.is_empty() { Value::Null } else { json!(total) },
            "sampled_model_name": report.sampled_model,
        },
        "sub_rewards": subs,
        "model_grader_token_usage_per_model": per_model,
    }))
}

/// `openai_grader`: an OpenAI grader object (option `grader`) as a reward function.
pub struct OpenAiGrader {
    grader: Grader,
    opts: GraderOptions,
}

impl OpenAiGrader {
    fn new(grader: &Value, opts: &GraderOptions) -> Result<OpenAiGrader, String> {
        Ok(OpenAiGrader {
            grader: Grader::parse(grader, "grader", opts, true)?,
            opts: opts.clone(),
        })
    }

    /// Reads the options `grader` (a table, or a JSON string), `base_url`, `api_key_env`,
    /// `allow_python`, `timeout_s`, `parallel`, `python`, `python_timeout_s`,
    /// `python_memory_mb` and `embeddings_model`; unset ones come from
    /// [`GraderOptions::from_env`].
    pub(crate) fn from_options(o: &mut Options<'_>) -> Result<OpenAiGrader, String> {
        let grader = match o.value("grader").cloned() {
            None => {
                return Err(o.err(
                    "grader",
                    "is required: an OpenAI grader object ({type = \"string_check\", ...})",
                ));
            }
            Some(Value::String(s)) => {
                serde_json::from_str(&s).map_err(|e| o.err("grader", format!("is not valid JSON: {e}")))?
            }
            Some(v) => v,
        };
        let mut opts = GraderOptions::from_env();
        if let Some(b) = o.string("base_url")? {
            opts.base_url = Some(b);
        }
        if let Some(var) = o.string("api_key_env")? {
            let key = std::env::var(&var)
                .map_err(|_| o.err("api_key_env", format!("names ${var}, which is not set")))?;
            opts.api_key = Some(key);
        }
        opts.allow_python = o.bool("allow_python")?.unwrap_or(false);
        opts.timeout = seconds(o, "timeout_s", 60.0)?;
        opts.parallel = usize::try_from(whole(o, "parallel", 4)?).unwrap_or(usize::MAX);
        if let Some(p) = o.string("python")? {
            opts.python = p;
        }
        opts.python_timeout = seconds(o, "python_timeout_s", 10.0)?;
        opts.python_memory_mb = whole(o, "python_memory_mb", 1024)?;
        if let Some(m) = o.string("embeddings_model")? {
            opts.embeddings_model = m;
        }
        OpenAiGrader::new(&grader, &opts).map_err(|e| format!("openai_grader: option {e}"))
    }

    fn grade(&self, s: &Sample) -> Result<f64, RewardError> {
        let item = Value::Object(s.columns.clone());
        let output_json: Option<Value> = serde_json::from_str(s.completion).ok();
        let ctx = Ctx {
            output_text: s.completion,
            output_json: output_json.as_ref(),
            item: &item,
        };
        self.grader
            .grade(&ctx, &self.opts, &mut Report::default())
            .map_err(|e| RewardError::new("openai_grader", format!("{}: {}", self.grader.name, e.message)))
    }
}

impl RewardFn for OpenAiGrader {
    fn name(&self) -> &str {
        "openai_grader"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        self.grade(s)
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<f64, RewardError>> {
        parallel_map(
            samples.len(),
            self.opts.parallel,
            |i| self.grade(&samples[i]),
            || {
                Err(RewardError::new(
                    "openai_grader",
                    "not graded (a grading thread panicked)",
                ))
            },
        )
    }
}

/// What one grading sees: the sample and the dataset item.
struct Ctx<'a> {
    output_text: &'a str,
    output_json: Option<&'a Value>,
    item: &'a Value,
}

/// Token counts of one model.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    prompt: u64,
    completion: u64,
    total: u64,
    cached: u64,
}

/// What a grading used and scored besides its reward, for [`run_grader`].
#[derive(Default)]
struct Report {
    usage: BTreeMap<String, Usage>,
    sampled_model: Option<String>,
    sub_rewards: BTreeMap<String, f64>,
}

/// Which of OpenAI's `metadata.errors` flags a grading error sets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ErrorKind {
    InvalidVariable,
    SampleParse,
    ModelParse,
    ModelRefusal,
    ModelServer,
    PythonRuntime,
    PythonServer,
    Unresponsive,
    Other,
}

impl ErrorKind {
    fn flag(self) -> &'static str {
        match self {
            ErrorKind::InvalidVariable => "invalid_variable_error",
            ErrorKind::SampleParse => "sample_parse_error",
            ErrorKind::ModelParse => "model_grader_parse_error",
            ErrorKind::ModelRefusal => "model_grader_refusal_error",
            ErrorKind::ModelServer => "model_grader_server_error",
            ErrorKind::PythonRuntime => "python_grader_runtime_error",
            ErrorKind::PythonServer => "python_grader_server_error",
            ErrorKind::Unresponsive => "unresponsive_reward_error",
            ErrorKind::Other => "other_error",
        }
    }
}

/// Why a sample could not be graded.
#[derive(Clone, Debug)]
struct GradeError {
    kind: ErrorKind,
    message: String,
}

fn fail<T>(kind: ErrorKind, message: impl Into<String>) -> Result<T, GradeError> {
    Err(GradeError {
        kind,
        message: message.into(),
    })
}

/// A validated grader.
struct Grader {
    name: String,
    kind: Kind,
}

enum Kind {
    StringCheck {
        input: Template,
        reference: Template,
        operation: StringOp,
    },
    TextSimilarity {
        input: Template,
        reference: Template,
        metric: String,
    },
    ScoreModel {
        call: ModelCall,
        range: (f64, f64),
    },
    LabelModel {
        call: ModelCall,
        labels: Vec<String>,
        passing: Vec<String>,
    },
    Python {
        source: String,
    },
    Multi {
        graders: Vec<Grader>,
        formula: Expr,
    },
}

impl Kind {
    fn type_name(&self) -> &'static str {
        match self {
            Kind::StringCheck { .. } => "string_check",
            Kind::TextSimilarity { .. } => "text_similarity",
            Kind::ScoreModel { .. } => "score_model",
            Kind::LabelModel { .. } => "label_model",
            Kind::Python { .. } => "python",
            Kind::Multi { .. } => "multi",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum StringOp {
    Eq,
    Ne,
    Like,
    Ilike,
}

const METRICS: &[&str] = &[
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "cosine",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
];

/// A chat request a model grader sends, its messages still templates.
struct ModelCall {
    model: String,
    messages: Vec<(String, Content)>,
    sampling: Map<String, Value>,
    url: String,
    client: Client,
}

enum Content {
    Text(Template),
    /// Content parts: `Ok(text)` or `Err((image url, detail))`.
    Parts(Vec<Result<Template, (Template, Option<String>)>>),
}

/// A JSON object being read: its path for errors and the fields asked for.
struct Fields<'a> {
    path: &'a str,
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(v: &'a Value, path: &'a str) -> Result<Fields<'a>, String> {
        match v {
            Value::Object(map) => Ok(Fields {
                path,
                map,
                used: Vec::new(),
            }),
            v => Err(format!(
                "{path}: expected an object, got {}",
                short(&v.to_string())
            )),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn required(&mut self, key: &'static str) -> Result<&'a Value, String> {
        self.get(key)
            .ok_or_else(|| format!("{}: is required", self.at(key)))
    }

    fn string(&mut self, key: &'static str) -> Result<String, String> {
        match self.required(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(format!(
                "{}: expected a string, got {}",
                self.at(key),
                short(&v.to_string())
            )),
        }
    }

    /// One of `choices`.
    fn choice(&mut self, key: &'static str, choices: &[&str]) -> Result<String, String> {
        let s = self.string(key)?;
        if choices.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(format!(
                "{}: expected one of {}, got {:?}",
                self.at(key),
                choices.join(", "),
                s
            ))
        }
    }

    /// Fails on a field nobody asked for.
    fn finish(&self) -> Result<(), String> {
        let mut unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !self.used.contains(&k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(k) => {
                let mut known = self.used.clone();
                known.sort_unstable();
                known.dedup();
                Err(format!(
                    "{}: unknown field (known: {})",
                    self.at(k),
                    known.join(", ")
                ))
            }
        }
    }
}

impl Grader {
    /// Reads the grader at `path`; `top` allows a `multi` grader.
    fn parse(v: &Value, path: &str, opts: &GraderOptions, top: bool) -> Result<Grader, String> {
        let mut f = Fields::new(v, path)?;
        let types = [
            "string_check",
            "text_similarity",
            "score_model",
            "label_model",
            "python",
            "multi",
        ];
        let ty = f.choice("type", &types)?;
        let name = f.string("name")?;
        let kind = match ty.as_str() {
            "string_check" => {
                let input = Template::parse(&f.string("input")?, &f.at("input"))?;
                let reference = Template::parse(&f.string("reference")?, &f.at("reference"))?;
                let operation = match f.choice("operation", &["eq", "ne", "like", "ilike"])?.as_str() {
                    "eq" => StringOp::Eq,
                    "ne" => StringOp::Ne,
                    "like" => StringOp::Like,
                    _ => StringOp::Ilike,
                };
                Kind::StringCheck {
                    input,
                    reference,
                    operation,
                }
            }
            "text_similarity" => {
                let input = Template::parse(&f.string("input")?, &f.at("input"))?;
                let reference = Template::parse(&f.string("reference")?, &f.at("reference"))?;
                let metric = f.choice("evaluation_metric", METRICS)?;
                if metric == "cosine" && opts.base_url.is_none() {
                    return Err(format!(
                        "{}: \"cosine\" needs an OpenAI-compatible embeddings endpoint: set base_url \
                         (option, or $GRAFT_GRADER_BASE_URL / $OPENAI_BASE_URL)",
                        f.at("evaluation_metric")
                    ));
                }
                Kind::TextSimilarity {
                    input,
                    reference,
                    metric,
                }
            }
            "score_model" => {
                let call = ModelCall::parse(&mut f, opts, &ty)?;
                let range = match f.get("range") {
                    None => (0.0, 1.0),
                    Some(Value::Array(a))
                        if a.len() == 2
                            && a[0].as_f64().zip(a[1].as_f64()).is_some_and(|(lo, hi)| lo < hi) =>
                    {
                        (a[0].as_f64().unwrap_or(0.0), a[1].as_f64().unwrap_or(1.0))
                    }
                    Some(v) => {
                        return Err(format!(
                            "{}: expected [low, high] with low < high, got {v}",
                            f.at("range")
                        ));
                    }
                };
                Kind::ScoreModel { call, range }
            }
            "label_model" => {
                let call = ModelCall::parse(&mut f, opts, &ty)?;
                let labels = string_list(f.required("labels")?, &f.at("labels"))?;
                if labels.is_empty() {
                    return Err(format!("{}: must name at least one label", f.at("labels")));
                }
                let passing = string_list(f.required("passing_labels")?, &f.at("passing_labels"))?;
                if let Some(p) = passing.iter().find(|p| !labels.contains(p)) {
                    return Err(format!(
                        "{}: {p:?} is not one of labels ({})",
                        f.at("passing_labels"),
                        labels.join(", ")
                    ));
                }
                Kind::LabelModel {
                    call,
                    labels,
                    passing,
                }
            }
            "python" => {
                let source = f.string("source")?;
                if let Some(t) = f.get("image_tag")
                    && !t.is_string()
                {
                    return Err(format!("{}: expected a string, got {t}", f.at("image_tag")));
                }
                if !opts.allow_python {
                    return Err(format!(
                        "{}: python graders run code and are off; enable them with allow_python = true \
                         (graft serve: its flag for python graders)",
                        f.at("source")
                    ));
                }
                if !source.contains("def grade") {
                    return Err(format!("{}: must define grade(sample, item)", f.at("source")));
                }
                Kind::Python { source }
            }
            _ => {
                if !top {
                    return Err(format!(
                        "{}: a multi grader cannot hold another multi grader",
                        f.at("type")
                    ));
                }
                let at = f.at("graders");
                let mut graders = Vec::new();
                match f.required("graders")? {
                    // the SDK types `graders` as one grader; OpenAI's guide as {name: grader}
                    g @ Value::Object(m) if m.get("type").is_some_and(Value::is_string) => {
                        graders.push(Grader::parse(g, &at, opts, false)?);
                    }
                    Value::Object(m) => {
                        for (key, g) in m {
                            let mut sub = Grader::parse(g, &format!("{at}.{key}"), opts, false)?;
                            sub.name = key.clone();
                            graders.push(sub);
                        }
                    }
                    v => {
                        return Err(format!(
                            "{at}: expected an object of {{name: grader}}, got {}",
                            short(&v.to_string())
                        ));
                    }
                }
                if graders.is_empty() {
                    return Err(format!("{at}: must hold at least one grader"));
                }
                let src = f.string("calculate_output")?;
                let formula =
                    formula::parse(&src).map_err(|e| format!("{}: {e}", f.at("calculate_output")))?;
                if let Some(n) = formula
                    .names()
                    .into_iter()
                    .find(|n| !graders.iter().any(|g| g.name == *n))
                {
                    let known: Vec<&str> = graders.iter().map(|g| g.name.as_str()).collect();
                    return Err(format!(
                        "{}: `{n}` is not a grader of graders (known: {})",
                        f.at("calculate_output"),
                        known.join(", ")
                    ));
                }
                Kind::Multi { graders, formula }
            }
        };
        f.finish()?;
        Ok(Grader { name, kind })
    }

    /// The sample's score.
    fn grade(&self, ctx: &Ctx, opts: &GraderOptions, report: &mut Report) -> Result<f64, GradeError> {
        match &self.kind {
            Kind::StringCheck {
                input,
                reference,
                operation,
            } => {
                let (a, b) = (input.render(ctx)?, reference.render(ctx)?);
                let hit = match operation {
                    StringOp::Eq => a == b,
                    StringOp::Ne => a != b,
                    StringOp::Like => a.contains(&b),
                    StringOp::Ilike => a.to_lowercase().contains(&b.to_lowercase()),
                };
                Ok(if hit { 1.0 } else { 0.0 })
            }
            Kind::TextSimilarity {
                input,
                reference,
                metric,
            } => {
                let (a, b) = (input.render(ctx)?, reference.render(ctx)?);
                Ok(match metric.as_str() {
                    "fuzzy_match" => similarity::fuzzy_match(&a, &b),
                    "bleu" => similarity::bleu(&a, &b),
                    "gleu" => similarity::gleu(&a, &b),
                    "meteor" => similarity::meteor(&a, &b),
                    "rouge_l" => similarity::rouge_l(&a, &b),
                    "cosine" => cosine(&a, &b, opts, report)?,
                    m => similarity::rouge_n(&a, &b, m.trim_start_matches("rouge_").parse().unwrap_or(1)),
                })
            }
            Kind::ScoreModel { call, range } => {
                let reply = call.send(ctx, report)?;
                let text = reply.content.trim();
                let x = result_field(text)
                    .and_then(|v| {
                        v.as_f64()
                            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    })
                    .or_else(|| first_number(text));
                match x {
                    Some(x) if x.is_finite() => Ok(x.clamp(range.0, range.1)),
                    _ => fail(
                        ErrorKind::ModelParse,
                        format!("the score model's reply has no number: {:?}", short(text)),
                    ),
                }
            }
            Kind::LabelModel {
                call,
                labels,
                passing,
            } => {
                let reply = call.send(ctx, report)?;
                let label = pick_label(reply.content.trim(), labels).ok_or_else(|| GradeError {
                    kind: ErrorKind::ModelParse,
                    message: format!(
                        "the label model's reply names none of the labels ({}): {:?}",
                        labels.join(", "),
                        short(&reply.content)
                    ),
                })?;
                Ok(if passing.contains(label) { 1.0 } else { 0.0 })
            }
            Kind::Python { source } => python(source, ctx, opts),
            Kind::Multi { graders, formula } => {
                let mut scores = BTreeMap::new();
                for g in graders {
                    match g.grade(ctx, opts, report) {
                        Ok(x) => {
                            scores.insert(g.name.clone(), x);
                            report.sub_rewards.insert(g.name.clone(), x);
                        }
                        Err(e) => {
                            return Err(GradeError {
                                kind: e.kind,
                                message: format!("grader `{}`: {}", g.name, e.message),
                            });
                        }
                    }
                }
                let x = formula.eval(&|n| scores.get(n).copied());
                if x.is_finite() {
                    Ok(x)
                } else {
                    fail(
                        ErrorKind::Other,
                        format!("calculate_output gave {x} (a division by zero, or log/sqrt of a negative?)"),
                    )
                }
            }
        }
    }
}

/// A list of strings at `path`.
fn string_list(v: &Value, path: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{path}[{i}]: expected a string, got {x}"))
            })
            .collect(),
        v => Err(format!("{path}: expected a list of strings, got {v}")),
    }
}

/// `result` of a reply that is a JSON object holding one.
fn result_field(text: &str) -> Option<Value> {
    let body = text
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    match serde_json::from_str::<Value>(body).ok()? {
        Value::Object(mut o) => o.remove("result"),
        v @ Value::Number(_) => Some(v),
        _ => None,
    }
}

/// The label a reply names: `{"result": label}`, the reply itself (quotes and a final `.`
/// aside, any case), or the only label it mentions as a word.
fn pick_label<'l>(text: &str, labels: &'l [String]) -> Option<&'l String> {
    let said = match result_field(text) {
        Some(Value::String(s)) => s,
        _ => text
            .trim_matches(|c: char| c == '"' || c == '\'' || c == '.' || c.is_whitespace())
            .to_string(),
    };
    if let Some(l) = labels.iter().find(|l| **l == said) {
        return Some(l);
    }
    if let Some(l) = labels.iter().find(|l| l.to_lowercase() == said.to_lowercase()) {
        return Some(l);
    }
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .collect();
    let mentioned: Vec<&String> = labels
        .iter()
        .filter(|l| words.contains(&l.to_lowercase().as_str()))
        .collect();
    match mentioned.as_slice() {
        [one] => Some(one),
        _ => None,
    }
}

impl ModelCall {
    fn parse(f: &mut Fields, opts: &GraderOptions, ty: &str) -> Result<ModelCall, String> {
        let model = f.string("model")?;
        let Some(base) = &opts.base_url else {
            return Err(format!(
                "{}: a {ty} grader calls a chat model, and OpenAI's JSON names no endpoint: set base_url \
                 (option, or $GRAFT_GRADER_BASE_URL / $OPENAI_BASE_URL) to an OpenAI-compatible API",
                f.at("model")
            ));
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "base_url: must start with http:// or https://, not `{base}`"
            ));
        }
        let at = f.at("input");
        let messages = match f.required("input")? {
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .enumerate()
                .map(|(i, m)| message(m, &format!("{at}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            v => {
                return Err(format!(
                    "{at}: expected a non-empty list of messages, got {}",
                    short(&v.to_string())
                ));
            }
        };
        let mut sampling = Map::new();
        if ty == "score_model"
            && let Some(sp) = f.get("sampling_params")
        {
            let at = f.at("sampling_params");
            let mut s = Fields::new(sp, &at)?;
            for (key, to) in [
                ("max_completions_tokens", "max_completion_tokens"),
                ("seed", "seed"),
                ("temperature", "temperature"),
                ("top_p", "top_p"),
            ] {
                if let Some(v) = s.get(key) {
                    let ok = if matches!(key, "max_completions_tokens" | "seed") {
                        v.is_i64() || v.is_u64()
                    } else {
                        v.is_number()
                    };
                    if !ok {
                        return Err(format!("{}: expected a number, got {v}", s.at(key)));
                    }
                    sampling.insert(to.into(), v.clone());
                }
            }
            if let Some(v) = s.get("reasoning_effort") {
                sampling.insert("reasoning_effort".into(), v.clone());
            }
            s.finish()?;
        }
        let mut headers = Vec::new();
        if let Some(k) = &opts.api_key {
            headers.push(("authorization".to_string(), format!("Bearer {k}")));
        }
        let url = endpoint(base, "chat/completions");
        Ok(ModelCall {
            model,
            messages,
            sampling,
            client: Client::new(&url, opts.timeout, headers),
            url,
        })
    }

    /// Sends the rendered messages; the reply, its usage recorded in `report`.
    fn send(&self, ctx: &Ctx, report: &mut Report) -> Result<ChatReply, GradeError> {
        let mut messages = Vec::new();
        for (role, content) in &self.messages {
            let content = match content {
                Content::Text(t) => Value::String(t.render(ctx)?),
                Content::Parts(parts) => {
                    let mut out = Vec::new();
                    for p in parts {
                        out.push(match p {
                            Ok(t) => json!({"type": "text", "text": t.render(ctx)?}),
                            Err((url, detail)) => {
                                let mut image = json!({"url": url.render(ctx)?});
                                if let Some(d) = detail {
                                    image["detail"] = json!(d);
                                }
                                json!({"type": "image_url", "image_url": image})
                            }
                        });
                    }
                    Value::Array(out)
                }
            };
            messages.push(json!({"role": role, "content": content}));
        }
        let mut body = json!({"model": self.model, "messages": messages});
        for (k, v) in &self.sampling {
            body[k] = v.clone();
        }
        let reply = chat_completion(&self.client, &self.url, &body).map_err(|e| GradeError {
            kind: if e.contains("no complete reply within") {
                ErrorKind::Unresponsive
            } else {
                ErrorKind::ModelServer
            },
            message: e,
        })?;
        let model = reply.model.clone().unwrap_or_else(|| self.model.clone());
        if let Some(u) = &reply.usage {
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            let e = report.usage.entry(model.clone()).or_default();
            e.prompt += n(&u["prompt_tokens"]);
            e.completion += n(&u["completion_tokens"]);
            e.total += n(&u["total_tokens"]);
            e.cached += n(&u["prompt_tokens_details"]["cached_tokens"]);
        }
        report.sampled_model = Some(model);
        if let Some(r) = &reply.refusal {
            return fail(
                ErrorKind::ModelRefusal,
                format!("the grader model refused: {}", short(r)),
            );
        }
        Ok(reply)
    }
}

/// One message of a model grader's `input`: `{role, content, type?}`.
fn message(v: &Value, path: &str) -> Result<(String, Content), String> {
    let mut f = Fields::new(v, path)?;
    let role = f.choice("role", &["user", "assistant", "system", "developer"])?;
    // chat servers other than OpenAI's know `system`, not `developer`
    let role = if role == "developer" {
        "system".to_string()
    } else {
        role
    };
    if let Some(t) = f.get("type")
        && t != "message"
    {
        return Err(format!("{}: expected \"message\", got {t}", f.at("type")));
    }
    let at = f.at("content");
    let content = match f.required("content")? {
        Value::String(s) => Content::Text(Template::parse(s, &at)?),
        Value::Array(a) => Content::Parts(
            a.iter()
                .enumerate()
                .map(|(i, p)| part(p, &format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        p @ Value::Object(_) => Content::Parts(vec![part(p, &at)?]),
        v => {
            return Err(format!(
                "{at}: expected a string, a content object or a list, got {v}"
            ));
        }
    };
    f.finish()?;
    Ok((role, content))
}

/// A content part: `input_text` / `output_text` `{type, text}`, or `input_image`
/// `{type, image_url, detail?}`.
fn part(v: &Value, path: &str) -> Result<Result<Template, (Template, Option<String>)>, String> {
    if let Value::String(s) = v {
        return Ok(Ok(Template::parse(s, path)?));
    }
    let mut f = Fields::new(v, path)?;
    let ty = f.string("type")?;
    let out = match ty.as_str() {
        "input_text" | "output_text" => Ok(Template::parse(&f.string("text")?, &f.at("text"))?),
        "input_image" => {
            let url = Template::parse(&f.string("image_url")?, &f.at("image_url"))?;
            let detail = match f.get("detail") {
                None => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(d) => return Err(format!("{}: expected a string, got {d}", f.at("detail"))),
            };
            Err((url, detail))
        }
        "input_audio" => return Err(format!("{}: input_audio is not supported by graft", f.at("type"))),
        _ => {
            return Err(format!(
                "{}: expected one of input_text, output_text, input_image, got {ty:?}",
                f.at("type")
            ));
        }
    };
    f.finish()?;
    Ok(out)
}

/// `cosine`: the cosine similarity of the two texts' embeddings from `{base_url}/embeddings`.
fn cosine(a: &str, b: &str, opts: &GraderOptions, report: &mut Report) -> Result<f64, GradeError> {
    let base = opts.base_url.as_deref().unwrap_or_default();
    let url = endpoint(base, "embeddings");
    let mut headers = Vec::new();
    if let Some(k) = &opts.api_key {
        headers.push(("authorization".to_string(), format!("Bearer {k}")));
    }
    let client = Client::new(&url, opts.timeout, headers);
    let reply = post_json(
        &client,
        &url,
        &json!({"model": opts.embeddings_model, "input": [a, b]}),
    )
    .map_err(|e| GradeError {
        kind: ErrorKind::ModelServer,
        message: e,
    })?;
    let vector = |i: usize| -> Option<Vec<f64>> {
        reply["data"]
            .as_array()?
            .iter()
            .find(|d| d["index"].as_u64() == Some(i as u64))
            .or_else(|| reply["data"].get(i))?["embedding"]
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect()
    };
    let (Some(x), Some(y)) = (vector(0), vector(1)) else {
        return fail(
            ErrorKind::ModelServer,
            format!(
                "{url} answered {}; expected data[0..2].embedding",
                short(&reply.to_string())
            ),
        );
    };
    if let Some(t) = reply["usage"]["total_tokens"].as_u64() {
        let e = report.usage.entry(opts.embeddings_model.clone()).or_default();
        e.prompt += reply["usage"]["prompt_tokens"].as_u64().unwrap_or(t);
        e.total += t;
    }
    let dot: f64 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
    let norm = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
    let (nx, ny) = (norm(&x), norm(&y));
    if x.len() != y.len() || nx == 0.0 || ny == 0.0 {
        return fail(
            ErrorKind::ModelServer,
            format!("{url} answered embeddings of different sizes or zero"),
        );
    }
    Ok(dot / (nx * ny))
}

/// The harness around a `python` grader's source: reads `input.json`, calls `grade`, writes
/// `result.json`; a failure is a traceback on stderr and a non-zero exit.
const PYTHON_HARNESS: &str = r#"import json, math, sys
with open("input.json", encoding="utf-8") as f:
    data = json.load(f)
with open("grader.py", encoding="utf-8") as f:
    source = f.read()
namespace = {"__name__": "grader"}
exec(compile(source, "grader.py", "exec"), namespace)
grade = namespace.get("grade")
if not callable(grade):
    sys.exit("the source defines no function grade(sample, item)")
r = grade(data["sample"], data["item"])
if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
    sys.exit(f"grade returned {r!r:.200}, not a finite number")
with open("result.json", "w", encoding="utf-8") as f:
    json.dump({"reward": float(r)}, f)
"#;

/// Runs a `python` grader's `grade(sample, item)` in the sandbox.
fn python(source: &str, ctx: &Ctx, opts: &GraderOptions) -> Result<f64, GradeError> {
    let input = json!({
        "sample": {"output_text": ctx.output_text, "output_json": ctx.output_json},
        "item": ctx.item,
    });
    let run = run_sandboxed(
        &opts.python,
        &[
            ("main.py", PYTHON_HARNESS),
            ("grader.py", source),
            ("input.json", &input.to_string()),
        ],
        opts.python_timeout,
        opts.python_memory_mb,
    )
    .map_err(|e| GradeError {
        kind: ErrorKind::PythonServer,
        message: e,
    })?;
    if run.outcome.timed_out {
        return fail(
            ErrorKind::Unresponsive,
            format!(
                "grade did not return within python_timeout_s = {}",
                opts.python_timeout.as_secs_f64()
            ),
        );
    }
    let reward = run
        .result
        .as_deref()
        .filter(|_| run.outcome.passed)
        .and_then(|r| serde_json::from_str::<Value>(r).ok())
        .and_then(|v| v["reward"].as_f64());
    match reward {
        Some(r) => Ok(r),
        None => {
            let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
            fail(
                ErrorKind::PythonRuntime,
                format!("grade failed: {}", short(&tail)),
            )
        }
    }
}

/// A string with `{{ namespace.path }}` fields.
#[derive(Clone, Debug, PartialEq)]
struct Template(Vec<Piece>);

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    /// A field: its text as written (`sample.output_json.a`) and its path after the namespace.
    Field {
        shown: String,
        sample: bool,
        path: Vec<Step>,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

impl Template {
    /// Parses `text` (at JSON path `at`, for errors). A `{{` without a closing `}}` is text.
    fn parse(text: &str, at: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            let Some(close) = rest[open + 2..].find("}}") else {
                break;
            };
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let inner = rest[open + 2..open + 2 + close].trim();
            pieces.push(field(inner).map_err(|e| format!("{at}: template {{{{ {inner} }}}}: {e}"))?);
            rest = &rest[open + 2 + close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    /// The text with every field filled in from `ctx`.
    fn render(&self, ctx: &Ctx) -> Result<String, GradeError> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field { shown, sample, path } => {
                    let (root, steps): (&Value, &[Step]) = if !sample {
                        (ctx.item, path)
                    } else if path[0] == Step::Key("output_text".into()) {
                        out.push_str(ctx.output_text);
                        continue;
                    } else {
                        match ctx.output_json {
                            Some(j) => (j, &path[1..]),
                            None => {
                                return fail(
                                    ErrorKind::SampleParse,
                                    format!("{{{{ {shown} }}}}: the sample's output is not JSON"),
                                );
                            }
                        }
                    };
                    let mut v = root;
                    for s in steps {
                        let next = match s {
                            Step::Key(k) => v.get(k.as_str()),
                            Step::Index(n) => v.get(*n).or_else(|| v.get(n.to_string().as_str())),
                        };
                        let Some(n) = next else {
                            return fail(
                                ErrorKind::InvalidVariable,
                                format!(
                                    "{{{{ {shown} }}}}: no such field in this {}",
                                    if *sample { "sample" } else { "item" }
                                ),
                            );
                        };
                        v = n;
                    }
                    match v {
                        Value::String(s) => out.push_str(s),
                        v => out.push_str(&v.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A field `sample.output_text`, `sample.output_json(.path)`, or `item(.path)`.
fn field(inner: &str) -> Result<Piece, String> {
    let mut path = Vec::new();
    let mut rest = inner;
    let mut first = true;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let (n, after) = r.split_once(']').ok_or("a `[` without `]`")?;
            let n = n.trim().trim_matches(|c| c == '"' || c == '\'');
            path.push(match n.parse::<usize>() {
                Ok(i) => Step::Index(i),
                Err(_) => Step::Key(n.to_string()),
            });
            rest = after;
            continue;
        }
        let r = if first {
            rest
        } else {
            rest.strip_prefix('.')
                .ok_or("expected `.` or `[` between parts")?
        };
        first = false;
        let end = r.find(['.', '[']).unwrap_or(r.len());
        let key = &r[..end];
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err("an empty or spaced part".into());
        }
        path.push(match key.parse::<usize>() {
            Ok(i) if !path.is_empty() => Step::Index(i),
            _ => Step::Key(key.to_string()),
        });
        rest = &r[end..];
    }
    let shown = inner.to_string();
    match path.first() {
        Some(Step::Key(ns)) if ns == "item" => Ok(Piece::Field {
            shown,
            sample: false,
            path: path[1..].to_vec(),
        }),
        Some(Step::Key(ns)) if ns == "sample" => match path.get(1) {
            Some(Step::Key(k)) if k == "output_text" && path.len() == 2 => Ok(Piece::Field {
                shown,
                sample: true,
                path: path[1..].to_vec(),
            }),
            Some(Step::Key(k)) if k == "output_json" => Ok(Piece::Field {
                shown,
                sample: true,
                path: path[1..].to_vec(),
            }),
            _ => Err("graft fills sample.output_text and sample.output_json(.field) only".into()),
        },
        _ => Err("the namespace must be `item` or `sample`".into()),
    }
}

#[cfg(test)]
#[path = "graders_tests.rs"]
mod tests;
