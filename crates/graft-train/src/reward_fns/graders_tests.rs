use super::*;
use crate::reward_fns::from_config;
use crate::reward_fns::tests::cols;
use std::io::{Read, Write};
use std::net::TcpListener;

fn opts() -> GraderOptions {
    GraderOptions::default()
}

/// `grader`'s score of `completion` on a row of `columns`.
fn score(grader: Value, completion: &str, columns: Value) -> Result<f64, String> {
    let f = grader_from_json(&grader, &opts())?;
    let c = cols(columns);
    f.score(&Sample {
        prompt: "",
        completion,
        columns: &c,
    })
    .map_err(|e| e.to_string())
}

fn check(op: &str, input: &str, reference: &str) -> Value {
    json!({"type": "string_check", "name": "c", "input": input, "reference": reference, "operation": op})
}

#[test]
fn string_check_operations() {
    let row = json!({"answer": "Paris"});
    let t = "{{sample.output_text}}";
    for (op, completion, want) in [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "paris", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris.", 1.0),
        ("like", "It is paris.", 0.0),
        ("ilike", "It is PARIS.", 1.0),
        ("ilike", "London", 0.0),
    ] {
        let got = score(check(op, t, "{{ item.answer }}"), completion, row.clone()).unwrap();
        assert_eq!(got, want, "{op} {completion}");
    }
}

#[test]
fn templates_fill_sample_and_item_fields() {
    let row = json!({"a": {"b": [10, {"c": "deep"}]}, "n": 3, "flag": true, "obj": {"k": 1}});
    let g = |input: &str, reference: &str| check("eq", input, reference);
    let ok = |input: &str, reference: &str, completion: &str| {
        score(g(input, reference), completion, row.clone()).unwrap()
    };
    assert_eq!(ok("{{item.a.b[1].c}}", "deep", ""), 1.0);
    assert_eq!(
        ok("{{ item.a.b.0 }}-{{item.n}}-{{item.flag}}", "10-3-true", ""),
        1.0
    );
    assert_eq!(ok("{{item.obj}}", r#"{"k":1}"#, ""), 1.0);
    assert_eq!(ok("{{sample.output_json.x}}", "{{item.n}}", r#"{"x": 3}"#), 1.0);
    assert_eq!(ok("{{sample.output_json}}", r#"[1,2]"#, "[1, 2]"), 1.0);
    // a completion holding a template is text, not filled in
    assert_eq!(ok("{{sample.output_text}}", "{{item.n}}", "{{item.n}}"), 0.0);
    assert_eq!(ok("{{ not closed", "{{ not closed", ""), 1.0);

    let e = score(g("{{item.a.x}}", "y"), "", row.clone()).unwrap_err();
    assert_eq!(e, "openai_grader: c: {{ item.a.x }}: no such field in this item");
    let e = score(g("{{sample.output_json.x}}", "y"), "not json", row.clone()).unwrap_err();
    assert_eq!(
        e,
        "openai_grader: c: {{ sample.output_json.x }}: the sample's output is not JSON"
    );
    let e = grader_from_json(&g("{{ foo.bar }}", "y"), &opts()).err().unwrap();
    assert_eq!(
        e,
        "grader.input: template {{ foo.bar }}: the namespace must be `item` or `sample`"
    );
    let e = grader_from_json(&g("x", "{{sample.output_tools}}"), &opts())
        .err()
        .unwrap();
    assert_eq!(
        e,
        "grader.reference: template {{ sample.output_tools }}: graft fills sample.output_text and sample.output_json(.field) only"
    );
}

#[test]
fn validation_errors_name_the_json_path() {
    let multi = |sub: Value| json!({"type": "multi", "name": "m", "graders": {"acc": sub}, "calculate_output": "acc"});
    for (g, want) in [
        (json!([1]), "grader: expected an object, got [1]"),
        (json!({"name": "x"}), "grader.type: is required"),
        (
            json!({"type": "regex", "name": "x"}),
            "grader.type: expected one of string_check, text_similarity, score_model, label_model, python, multi, got \"regex\"",
        ),
        (json!({"type": "string_check"}), "grader.name: is required"),
        (
            multi(check("equals", "a", "b")),
            "grader.graders.acc.operation: expected one of eq, ne, like, ilike, got \"equals\"",
        ),
        (
            json!({"type": "string_check", "name": "c", "input": "a", "reference": "b", "operation": "eq", "pass_threshold": 1}),
            "grader.pass_threshold: unknown field (known: input, name, operation, reference, type)",
        ),
        (
            json!({"type": "string_check", "name": "c", "input": 1, "reference": "b", "operation": "eq"}),
            "grader.input: expected a string, got 1",
        ),
        (
            json!({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "rouge_6"}),
            "grader.evaluation_metric: expected one of fuzzy_match, bleu, gleu, meteor, cosine, rouge_1, rouge_2, rouge_3, rouge_4, rouge_5, rouge_l, got \"rouge_6\"",
        ),
        (
            json!({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "cosine"}),
            "grader.evaluation_metric: \"cosine\" needs an OpenAI-compatible embeddings endpoint",
        ),
        (
            json!({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}]}),
            "grader.model: a score_model grader calls a chat model, and OpenAI's JSON names no endpoint",
        ),
        (
            multi(json!({"type": "multi", "name": "n", "graders": {}, "calculate_output": "1"})),
            "grader.graders.acc.type: a multi grader cannot hold another multi grader",
        ),
        (
            json!({"type": "multi", "name": "m", "graders": {"acc": check("eq", "a", "a")}, "calculate_output": "acc + fuzz"}),
            "grader.calculate_output: `fuzz` is not a grader of graders (known: acc)",
        ),
        (
            json!({"type": "multi", "name": "m", "graders": {"acc": check("eq", "a", "a")}, "calculate_output": "acc +"}),
            "grader.calculate_output: expected a number, a grader name or `(` at the end (character 6)",
        ),
        (
            json!({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}),
            "grader.source: python graders run code and are off; enable them with allow_python = true",
        ),
    ] {
        let e = grader_from_json(&g, &opts())
            .err()
            .unwrap_or_else(|| panic!("{g} was accepted"));
        assert!(e.starts_with(want), "{g}:\n got  {e}\n want {want}");
    }
    let with_url = GraderOptions {
        base_url: Some("http://127.0.0.1:9/v1".into()),
        ..opts()
    };
    for (g, want) in [
        (
            json!({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
                   "labels": ["good", "bad"], "passing_labels": ["great"]}),
            "grader.passing_labels: \"great\" is not one of labels (good, bad)",
        ),
        (
            json!({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "robot", "content": "x"}]}),
            "grader.input[0].role: expected one of user, assistant, system, developer, got \"robot\"",
        ),
        (
            json!({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]}),
            "grader.range: expected [low, high] with low < high, got [1,0]",
        ),
        (
            json!({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}],
                   "sampling_params": {"temprature": 0}}),
            "grader.sampling_params.temprature: unknown field",
        ),
        (
            json!({"type": "score_model", "name": "s", "model": "m",
                   "input": [{"role": "user", "content": {"type": "input_audio", "input_audio": {}}}]}),
            "grader.input[0].content.type: input_audio is not supported by graft",
        ),
    ] {
        let e = grader_from_json(&g, &with_url)
            .err()
            .unwrap_or_else(|| panic!("{g} was accepted"));
        assert!(e.starts_with(want), "{g}:\n got  {e}\n want {want}");
    }
}

#[test]
fn text_similarity_scores_each_metric() {
    let g = |metric: &str| {
        json!({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
               "reference": "{{item.ref}}", "evaluation_metric": metric})
    };
    let row = json!({"ref": "the cat sat on the mat"});
    let c = "the cat is on the mat";
    for (m, want) in [
        (
            "fuzzy_match",
            similarity::fuzzy_match(c, "the cat sat on the mat"),
        ),
        ("bleu", similarity::bleu(c, "the cat sat on the mat")),
        ("gleu", similarity::gleu(c, "the cat sat on the mat")),
        ("meteor", similarity::meteor(c, "the cat sat on the mat")),
        ("rouge_1", 5.0 / 6.0),
        ("rouge_2", 0.6),
        ("rouge_l", 5.0 / 6.0),
    ] {
        let got = score(g(m), c, row.clone()).unwrap();
        assert!((got - want).abs() < 1e-12, "{m}: {got} vs {want}");
    }
}

#[test]
fn multi_combines_sub_scores_and_run_grader_reports_them() {
    let g = json!({
        "type": "multi", "name": "combo",
        "graders": {
            "exact": check("eq", "{{sample.output_text}}", "{{item.answer}}"),
            "fuzzy": {"type": "text_similarity", "name": "f", "input": "{{sample.output_text}}",
                      "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"},
        },
        "calculate_output": "0.5 * exact + 0.5 * max(fuzzy, 0) ^ 2",
    });
    let got = score(g.clone(), "Pari", json!({"answer": "Paris"})).unwrap();
    let fuzzy = similarity::fuzzy_match("Pari", "Paris");
    assert!((got - 0.5 * fuzzy * fuzzy).abs() < 1e-12);

    let out = run_grader(&g, &opts(), &json!("Paris"), &json!({"answer": "Paris"})).unwrap();
    assert_eq!(out["reward"], json!(1.0));
    assert_eq!(out["sub_rewards"], json!({"exact": 1.0, "fuzzy": 1.0}));
    assert_eq!(out["metadata"]["name"], "combo");
    assert_eq!(out["metadata"]["type"], "multi");
    assert_eq!(out["metadata"]["errors"]["invalid_variable_error"], false);
    assert!(out["metadata"]["execution_time"].as_f64().unwrap() >= 0.0);
    assert_eq!(out["model_grader_token_usage_per_model"], json!({}));

    // A missing item field is a reward of 0 with the flag set, as OpenAI answers.
    let out = run_grader(&g, &opts(), &json!({"output_text": "Paris"}), &Value::Null).unwrap();
    assert_eq!(out["reward"], json!(0.0));
    assert_eq!(out["metadata"]["errors"]["invalid_variable_error"], true);
    assert_eq!(
        out["metadata"]["errors"]["graft_error_message"],
        "grader `exact`: {{ item.answer }}: no such field in this item"
    );
    // The formula's division by zero is an error, not a reward.
    let mut g0 = g.clone();
    g0["calculate_output"] = json!("exact / (fuzzy - fuzzy)");
    let out = run_grader(&g0, &opts(), &json!("x"), &json!({"answer": "Paris"})).unwrap();
    assert_eq!(out["metadata"]["errors"]["other_error"], true);
    // output_json comes from a JSON model_sample string, or is given.
    let j = check("eq", "{{sample.output_json.a}}", "1");
    assert_eq!(
        run_grader(&j, &opts(), &json!(r#"{"a": 1}"#), &Value::Null).unwrap()["reward"],
        json!(1.0)
    );
    let s = json!({"output_json": {"a": 1}});
    assert_eq!(
        run_grader(&j, &opts(), &s, &Value::Null).unwrap()["reward"],
        json!(1.0)
    );
    for (sample, item, want) in [
        (
            json!(3),
            Value::Null,
            "model_sample: expected a string or an object, got 3",
        ),
        (
            json!({"text": "x"}),
            Value::Null,
            "model_sample: unknown field `text`",
        ),
        (json!("x"), json!([1]), "item: expected an object, got [1]"),
    ] {
        let e = run_grader(&j, &opts(), &sample, &item).unwrap_err();
        assert!(e.starts_with(want), "{e}");
    }
}

/// An HTTP server on 127.0.0.1 answering `n` requests with `reply(body)`; its URL and, when
/// joined, the request bodies.
fn server(
    n: usize,
    reply: impl Fn(&Value) -> String + Send + 'static,
) -> (String, std::thread::JoinHandle<Vec<Value>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..n {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let body = loop {
                let k = c.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..k]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap();
                    while buf.len() < p + 4 + len {
                        let k = c.read(&mut chunk).unwrap();
                        buf.extend_from_slice(&chunk[..k]);
                    }
                    break serde_json::from_slice::<Value>(&buf[p + 4..p + 4 + len]).unwrap();
                }
            };
            let text = reply(&body);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            seen.push(body);
        }
        seen
    });
    (url, h)
}

fn chat(content: &str) -> String {
    json!({"model": "judge-1", "choices": [{"message": {"role": "assistant", "content": content}}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
    .to_string()
}

#[test]
fn score_model_sends_templated_messages_and_clamps_the_number() {
    let (url, h) = server(3, |b| {
        let user = b["messages"][1]["content"].to_string();
        chat(if user.contains("good") {
            r#"{"result": 0.9, "steps": []}"#
        } else if user.contains("wild") {
            "I'd say 7"
        } else {
            "no idea"
        })
    });
    let o = GraderOptions {
        base_url: Some(url),
        api_key: Some("k".into()),
        ..opts()
    };
    let g = json!({
        "type": "score_model", "name": "s", "model": "judge",
        "input": [
            {"role": "developer", "content": "Grade from 0 to 1."},
            {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}} (ref {{item.ref}})"}]},
        ],
        "range": [0, 1],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 50, "seed": 7},
    });
    let f = grader_from_json(&g, &o).unwrap();
    let c = cols(json!({"ref": "R"}));
    let s = |completion| Sample {
        prompt: "",
        completion,
        columns: &c,
    };
    let got = f.score_batch(&[s("good"), s("wild"), s("meh")]);
    assert_eq!(got[0], Ok(0.9));
    assert_eq!(got[1], Ok(1.0), "7 is clamped to the range");
    let e = got[2].clone().unwrap_err().to_string();
    assert_eq!(
        e,
        "openai_grader: s: the score model's reply has no number: \"no idea\""
    );
    let bodies = h.join().unwrap();
    let good = bodies.iter().find(|b| b.to_string().contains("good")).unwrap();
    assert_eq!(
        good,
        &json!({
            "model": "judge",
            "messages": [
                {"role": "system", "content": "Grade from 0 to 1."},
                {"role": "user", "content": [{"type": "text", "text": "Answer: good (ref R)"}]},
            ],
            "temperature": 0, "max_completion_tokens": 50, "seed": 7,
        })
    );
}

#[test]
fn label_model_passes_listed_labels_and_reports_usage() {
    let (url, h) = server(4, |b| {
        let user = b["messages"][0]["content"].as_str().unwrap().to_string();
        chat(match user.as_str() {
            "a" => r#"{"result": "correct"}"#,
            "b" => "Incorrect.",
            "c" => "I think this one is partially correct",
            _ => "unsure",
        })
    });
    let o = GraderOptions {
        base_url: Some(url),
        ..opts()
    };
    let g = json!({"type": "label_model", "name": "l", "model": "judge",
                   "input": [{"role": "user", "content": "{{sample.output_text}}", "type": "message"}],
                   "labels": ["correct", "incorrect", "partially"], "passing_labels": ["correct"]});
    let out = run_grader(&g, &o, &json!("a"), &Value::Null).unwrap();
    assert_eq!(out["reward"], json!(1.0));
    assert_eq!(out["metadata"]["token_usage"], json!(12));
    assert_eq!(out["metadata"]["sampled_model_name"], "judge-1");
    assert_eq!(
        out["model_grader_token_usage_per_model"],
        json!({"judge-1": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cached_tokens": 0}})
    );
    assert_eq!(
        run_grader(&g, &o, &json!("b"), &Value::Null).unwrap()["reward"],
        json!(0.0)
    );
    // two labels mentioned: not parsed
    let out = run_grader(&g, &o, &json!("c"), &Value::Null).unwrap();
    assert_eq!(out["metadata"]["errors"]["model_grader_parse_error"], true);
    let out = run_grader(&g, &o, &json!("d"), &Value::Null).unwrap();
    assert_eq!(out["metadata"]["errors"]["model_grader_parse_error"], true);
    h.join().unwrap();
    // nobody listening: a server error with details
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = GraderOptions {
        base_url: Some(format!("http://127.0.0.1:{port}/v1")),
        ..opts()
    };
    let out = run_grader(&g, &o, &json!("a"), &Value::Null).unwrap();
    assert_eq!(out["metadata"]["errors"]["model_grader_server_error"], true);
    assert!(
        out["metadata"]["errors"]["model_grader_server_error_details"]
            .as_str()
            .unwrap()
            .starts_with(&format!("POST http://127.0.0.1:{port}/v1/chat/completions: "))
    );
}

#[test]
fn cosine_embeds_both_texts() {
    let (url, h) = server(1, |_| {
        json!({"data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 1, "embedding": [1.0, 1.0]}],
               "usage": {"prompt_tokens": 4, "total_tokens": 4}})
        .to_string()
    });
    let o = GraderOptions {
        base_url: Some(url),
        ..opts()
    };
    let g = json!({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                   "reference": "b", "evaluation_metric": "cosine"});
    let out = run_grader(&g, &o, &json!("a"), &Value::Null).unwrap();
    assert!(
        (out["reward"].as_f64().unwrap() - 0.5f64.sqrt()).abs() < 1e-12,
        "{out}"
    );
    let bodies = h.join().unwrap();
    assert_eq!(
        bodies[0],
        json!({"model": "text-embedding-3-large", "input": ["a", "b"]})
    );
}

#[test]
fn python_grader_runs_in_the_sandbox_only_when_allowed() {
    let g = json!({"type": "python", "name": "p", "image_tag": "2025-05-08",
                   "source": "def grade(sample, item):\n    return float(sample['output_text'] == item['answer']) + 0.25 * len(sample['output_json'] or [])\n"});
    let e = grader_from_json(&g, &opts()).err().unwrap();
    assert!(e.contains("allow_python = true"), "{e}");
    let e = from_config("openai_grader", &json!({"grader": g})).err().unwrap();
    assert!(
        e.starts_with("openai_grader: option grader.source: python graders run code and are off"),
        "{e}"
    );

    let o = GraderOptions {
        allow_python: true,
        python_timeout: Duration::from_secs(5),
        ..opts()
    };
    let out = run_grader(&g, &o, &json!("[1, 2]"), &json!({"answer": "[1, 2]"})).unwrap();
    if out["metadata"]["errors"]["python_grader_server_error"] == true {
        eprintln!("skipping: {}", out["metadata"]["errors"]["graft_error_message"]);
        return;
    }
    assert_eq!(out["reward"], json!(1.5), "{out}");
    let raise = json!({"type": "python", "name": "p", "source": "def grade(sample, item):\n    raise ValueError('bad sample')\n"});
    let out = run_grader(&raise, &o, &json!("x"), &Value::Null).unwrap();
    assert_eq!(out["metadata"]["errors"]["python_grader_runtime_error"], true);
    let details = out["metadata"]["errors"]["python_grader_runtime_error_details"]
        .as_str()
        .unwrap();
    assert!(details.ends_with("ValueError: bad sample"), "{details}");
    let text =
        json!({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 'high'\n"});
    let out = run_grader(&text, &o, &json!("x"), &Value::Null).unwrap();
    let details = out["metadata"]["errors"]["python_grader_runtime_error_details"]
        .as_str()
        .unwrap();
    assert!(
        details.contains("grade returned 'high', not a finite number"),
        "{details}"
    );
    let net = json!({"type": "python", "name": "p", "source": "import socket\ndef grade(sample, item):\n    s = socket.socket()\n    s.settimeout(2)\n    try:\n        s.connect(('1.1.1.1', 80))\n        return 1.0\n    except OSError:\n        return 0.0\n"});
    assert_eq!(
        run_grader(&net, &o, &json!("x"), &Value::Null).unwrap()["reward"],
        json!(0.0)
    );
    let slow = json!({"type": "python", "name": "p", "source": "def grade(sample, item):\n    while True:\n        pass\n"});
    let o1 = GraderOptions {
        python_timeout: Duration::from_secs(1),
        ..o
    };
    let out = run_grader(&slow, &o1, &json!("x"), &Value::Null).unwrap();
    assert_eq!(out["metadata"]["errors"]["unresponsive_reward_error"], true);
}

#[test]
fn from_config_builds_the_grader_from_a_table_or_json_text() {
    let g = check("eq", "{{sample.output_text}}", "{{item.answer}}");
    let f = from_config("openai_grader", &json!({"grader": g})).unwrap();
    assert_eq!(f.name(), "openai_grader");
    let c = cols(json!({"answer": "4"}));
    let s = Sample {
        prompt: "",
        completion: "4",
        columns: &c,
    };
    assert_eq!(f.score(&s), Ok(1.0));
    let f = from_config(
        "openai_grader",
        &json!({"grader": g.to_string(), "allow_python": false}),
    )
    .unwrap();
    assert_eq!(f.score(&s), Ok(1.0));
    for (args, want) in [
        (json!({}), "openai_grader: option `grader` is required"),
        (
            json!({"grader": "{"}),
            "openai_grader: option `grader` is not valid JSON",
        ),
        (
            json!({"grader": g, "url": "x"}),
            "openai_grader: unknown option `url`",
        ),
        (
            json!({"grader": g, "api_key_env": "GRAFT_TEST_NEVER_SET_7A1B"}),
            "openai_grader: option `api_key_env` names $GRAFT_TEST_NEVER_SET_7A1B, which is not set",
        ),
        (
            json!({"grader": {"type": "string_check", "name": "c"}}),
            "openai_grader: option grader.input: is required",
        ),
    ] {
        let e = from_config("openai_grader", &args).err().unwrap();
        assert!(e.starts_with(want), "{args}: {e}");
    }
}

#[test]
fn a_toml_rewards_entry_builds_a_multi_grader() {
    let t: toml::Table = toml::from_str(
        r#"
        name = "openai_grader"
        [grader]
        type = "multi"
        name = "answer"
        calculate_output = "0.7 * exact + 0.3 * overlap"
        [grader.graders.exact]
        type = "string_check"
        name = "exact"
        input = "{{ sample.output_text }}"
        reference = "{{ item.answer }}"
        operation = "ilike"
        [grader.graders.overlap]
        type = "text_similarity"
        name = "overlap"
        input = "{{ sample.output_text }}"
        reference = "{{ item.answer }}"
        evaluation_metric = "rouge_1"
        "#,
    )
    .unwrap();
    let mut args = serde_json::to_value(&t).unwrap();
    args.as_object_mut().unwrap().remove("name");
    let f = from_config("openai_grader", &args).unwrap();
    let c = cols(json!({"answer": "Paris"}));
    let s = Sample {
        prompt: "",
        completion: "It is paris",
        columns: &c,
    };
    let got = f.score(&s).unwrap();
    assert!((got - (0.7 + 0.3 * 0.5)).abs() < 1e-12, "{got}");
}
