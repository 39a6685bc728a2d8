//! `json_valid` and `json_schema`: is the completion JSON, and does it follow a schema? 1.0 or 0.0.
//!
//! The JSON is the content of the first ```` ```json ```` fenced block when the completion has
//! one, else the whole completion (trimmed).
//!
//! `json_schema` validates against option `schema` (a JSON Schema object or boolean), or else the
//! row's column `column` (default `schema`: an object, or a string holding one). [`validate`]
//! implements the common subset: `type` (a name or a list; `integer` is a number without a
//! fractional part), `enum`, `const`, `properties`, `patternProperties`, `required`,
//! `additionalProperties` (bool or schema), `minProperties`/`maxProperties`, `items` (a schema, or
//! a list for tuples), `minItems`/`maxItems`, `uniqueItems`, `minimum`/`maximum`,
//! `exclusiveMinimum`/`exclusiveMaximum` (numbers, or draft-4 booleans), `multipleOf`,
//! `minLength`/`maxLength` (in characters), `pattern` (unanchored), `allOf`/`anyOf`/`oneOf`/`not`.
//! Other keywords — `$ref`, `format`, `if`/`then` included — are ignored, as validators ignore
//! unknown ones. Numbers compare by value (`1` equals `1.0`).

use super::{Options, RewardError, RewardFn, Sample, score_bool};
use regex::Regex;
use serde_json::{Map, Value};

/// The text to parse as JSON: the first ```` ```json ```` block's content, else the trimmed text.
pub fn json_text(completion: &str) -> &str {
    let mut rest = completion;
    while let Some(at) = rest.find("```") {
        let after = &rest[at + 3..];
        let (lang, body) = after.split_once('\n').unwrap_or((after, ""));
        if lang.trim().eq_ignore_ascii_case("json") {
            let end = body.find("```").unwrap_or(body.len());
            return body[..end].trim();
        }
        rest = after;
    }
    completion.trim()
}

/// Parses the completion's JSON ([`json_text`]).
pub fn parse_completion(completion: &str) -> Option<Value> {
    serde_json::from_str(json_text(completion)).ok()
}

/// The `json_valid` reward function.
#[derive(Clone, Copy, Debug)]
pub struct JsonValid;

impl RewardFn for JsonValid {
    fn name(&self) -> &str {
        "json_valid"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        Ok(score_bool(parse_completion(s.completion).is_some()))
    }
}

/// Where `json_schema` gets its schema.
#[derive(Clone, Debug)]
enum SchemaSource {
    Fixed(Value),
    Column(String),
}

/// The `json_schema` reward function.
#[derive(Clone, Debug)]
pub struct JsonSchema {
    source: SchemaSource,
}

impl JsonSchema {
    /// Reads the options: `schema` (checked now) or `column` (default `schema`).
    pub(crate) fn from_options(o: &mut Options) -> Result<JsonSchema, String> {
        let schema = o.value("schema").cloned();
        let column = o.string("column")?;
        let source = match (schema, column) {
            (Some(_), Some(_)) => return Err(o.err("schema", "and option `column` exclude each other")),
            (Some(s), None) => {
                check_schema(&s).map_err(|e| o.err("schema", format!("is not a valid schema: {e}")))?;
                SchemaSource::Fixed(s)
            }
            (None, c) => SchemaSource::Column(c.unwrap_or_else(|| "schema".into())),
        };
        Ok(JsonSchema { source })
    }
}

impl RewardFn for JsonSchema {
    fn name(&self) -> &str {
        "json_schema"
    }

    fn score(&self, s: &Sample) -> Result<f64, RewardError> {
        let err = |m: String| RewardError::new("json_schema", m);
        let owned;
        let schema = match &self.source {
            SchemaSource::Fixed(v) => v,
            SchemaSource::Column(c) => {
                owned = match s.columns.get(c) {
                    None | Some(Value::Null) => return Err(err(format!("column `{c}` is missing"))),
                    Some(Value::String(t)) => {
                        serde_json::from_str(t).map_err(|e| err(format!("column `{c}` is not JSON: {e}")))?
                    }
                    Some(v) => v.clone(),
                };
                check_schema(&owned).map_err(|e| err(format!("column `{c}` is not a valid schema: {e}")))?;
                &owned
            }
        };
        Ok(match parse_completion(s.completion) {
            Some(v) => score_bool(validate(schema, &v).is_ok()),
            None => 0.0,
        })
    }
}

/// Checks that `schema` is an object or boolean whose subschemas are too, whose `type` names are
/// known and whose `pattern`s compile.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        other => return Err(format!("a schema must be an object or a boolean, not {other}")),
    };
    if let Some(t) = obj.get("type") {
        let names: Vec<&Value> = match t {
            Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        for n in names {
            match n.as_str() {
                Some("null" | "boolean" | "object" | "array" | "number" | "integer" | "string") => {}
                _ => return Err(format!("unknown type {n}")),
            }
        }
    }
    for key in ["pattern"] {
        if let Some(p) = obj.get(key) {
            let p = p.as_str().ok_or_else(|| format!("`{key}` must be a string"))?;
            Regex::new(p).map_err(|e| format!("`{key}` {p:?} is not a valid regex: {e}"))?;
        }
    }
    for key in ["properties", "patternProperties"] {
        if let Some(p) = obj.get(key) {
            let p = p
                .as_object()
                .ok_or_else(|| format!("`{key}` must be an object"))?;
            for (k, sub) in p {
                if key == "patternProperties" {
                    Regex::new(k).map_err(|e| format!("`patternProperties` key {k:?}: {e}"))?;
                }
                check_schema(sub)?;
            }
        }
    }
    for key in ["additionalProperties", "not"] {
        if let Some(sub) = obj.get(key) {
            check_schema(sub)?;
        }
    }
    if let Some(items) = obj.get("items") {
        match items {
            Value::Array(a) => a.iter().try_for_each(check_schema)?,
            sub => check_schema(sub)?,
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(subs) = obj.get(key) {
            let subs = subs.as_array().ok_or_else(|| format!("`{key}` must be a list"))?;
            subs.iter().try_for_each(check_schema)?;
        }
    }
    Ok(())
}

/// JSON equality with numbers compared by value.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn is_type(v: &Value, name: &str) -> bool {
    match name {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => match v {
            Value::Number(n) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
            _ => false,
        },
        _ => false,
    }
}

fn num(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

/// Validates `instance` against `schema`; the error says where (a JSON pointer) and why.
pub fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    validate_at(schema, instance, "")
}

fn validate_at(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s: &Map<String, Value> = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: the schema `false` allows nothing")),
        Value::Object(o) => o,
        _ => return Ok(()),
    };
    let fail = |why: String| Err(format!("{}: {why}", if at.is_empty() { "/" } else { at }));

    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(n) => is_type(v, n),
            Value::Array(ns) => ns.iter().any(|n| n.as_str().is_some_and(|n| is_type(v, n))),
            _ => true,
        };
        if !ok {
            return fail(format!("{v} is not of type {t}"));
        }
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.iter().any(|o| json_eq(o, v))
    {
        return fail(format!("{v} is not one of {}", Value::Array(options.clone())));
    }
    if let Some(c) = s.get("const")
        && !json_eq(c, v)
    {
        return fail(format!("{v} is not {c}"));
    }

    if let Value::Number(n) = v {
        let x = n.as_f64().unwrap_or(f64::NAN);
        let excl = |k: &str| s.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(m) = num(s.get("minimum"))
            && (x < m || (excl("exclusiveMinimum") && x == m))
        {
            return fail(format!("{x} is below the minimum {m}"));
        }
        if let Some(m) = num(s.get("maximum"))
            && (x > m || (excl("exclusiveMaximum") && x == m))
        {
            return fail(format!("{x} is above the maximum {m}"));
        }
        if let Some(m) = num(s.get("exclusiveMinimum"))
            && x <= m
        {
            return fail(format!("{x} is not above {m}"));
        }
        if let Some(m) = num(s.get("exclusiveMaximum"))
            && x >= m
        {
            return fail(format!("{x} is not below {m}"));
        }
        if let Some(m) = num(s.get("multipleOf")) {
            let q = x / m;
            if m > 0.0 && (q - q.round()).abs() > 1e-9 * q.abs().max(1.0) {
                return fail(format!("{x} is not a multiple of {m}"));
            }
        }
    }

    if let Value::String(text) = v {
        let len = text.chars().count() as f64;
        if let Some(m) = num(s.get("minLength"))
            && len < m
        {
            return fail(format!("{v} is shorter than {m}"));
        }
        if let Some(m) = num(s.get("maxLength"))
            && len > m
        {
            return fail(format!("{v} is longer than {m}"));
        }
        if let Some(Value::String(p)) = s.get("pattern") {
            let re = Regex::new(p).map_err(|e| format!("{at}: pattern {p:?}: {e}"))?;
            if !re.is_match(text) {
                return fail(format!("{v} does not match {p:?}"));
            }
        }
    }

    if let Value::Array(items) = v {
        let len = items.len() as f64;
        if let Some(m) = num(s.get("minItems"))
            && len < m
        {
            return fail(format!("{} items, fewer than {m}", items.len()));
        }
        if let Some(m) = num(s.get("maxItems"))
            && len > m
        {
            return fail(format!("{} items, more than {m}", items.len()));
        }
        if s.get("uniqueItems") == Some(&Value::Bool(true)) {
            for (i, a) in items.iter().enumerate() {
                if items[..i].iter().any(|b| json_eq(a, b)) {
                    return fail(format!("item {i} repeats an earlier one"));
                }
            }
        }
        match s.get("items") {
            Some(Value::Array(tuple)) => {
                for (i, (sub, item)) in tuple.iter().zip(items).enumerate() {
                    validate_at(sub, item, &format!("{at}/{i}"))?;
                }
            }
            Some(sub) => {
                for (i, item) in items.iter().enumerate() {
                    validate_at(sub, item, &format!("{at}/{i}"))?;
                }
            }
            None => {}
        }
    }

    if let Value::Object(obj) = v {
        let len = obj.len() as f64;
        if let Some(m) = num(s.get("minProperties"))
            && len < m
        {
            return fail(format!("{} properties, fewer than {m}", obj.len()));
        }
        if let Some(m) = num(s.get("maxProperties"))
            && len > m
        {
            return fail(format!("{} properties, more than {m}", obj.len()));
        }
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    return fail(format!("property `{r}` is required"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        let mut patterns = Vec::new();
        if let Some(pp) = s.get("patternProperties").and_then(Value::as_object) {
            for (p, sub) in pp {
                let re = Regex::new(p).map_err(|e| format!("{at}: patternProperties {p:?}: {e}"))?;
                patterns.push((re, sub));
            }
        }
        let additional = s.get("additionalProperties");
        for (k, item) in obj {
            let here = format!("{at}/{k}");
            let mut matched = false;
            if let Some(sub) = props.and_then(|p| p.get(k)) {
                matched = true;
                validate_at(sub, item, &here)?;
            }
            for (re, sub) in &patterns {
                if re.is_match(k) {
                    matched = true;
                    validate_at(sub, item, &here)?;
                }
            }
            if !matched {
                match additional {
                    Some(Value::Bool(false)) => return fail(format!("property `{k}` is not allowed")),
                    Some(sub) => validate_at(sub, item, &here)?,
                    None => {}
                }
            }
        }
    }

    if let Some(Value::Array(subs)) = s.get("allOf") {
        for sub in subs {
            validate_at(sub, v, at)?;
        }
    }
    if let Some(Value::Array(subs)) = s.get("anyOf")
        && !subs.iter().any(|sub| validate_at(sub, v, at).is_ok())
    {
        return fail("matches none of `anyOf`".into());
    }
    if let Some(Value::Array(subs)) = s.get("oneOf") {
        let n = subs.iter().filter(|sub| validate_at(sub, v, at).is_ok()).count();
        if n != 1 {
            return fail(format!("matches {n} of `oneOf`, not exactly one"));
        }
    }
    if let Some(sub) = s.get("not")
        && validate_at(sub, v, at).is_ok()
    {
        return fail("matches the `not` schema".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cols, score};
    use super::super::{Sample, from_config};
    use super::*;
    use serde_json::json;

    /// Asserts every `ok` instance validates and every `bad` one does not.
    fn check(schema: Value, ok: &[Value], bad: &[Value]) {
        check_schema(&schema).unwrap();
        for v in ok {
            assert!(
                validate(&schema, v).is_ok(),
                "{schema} should accept {v}: {:?}",
                validate(&schema, v)
            );
        }
        for v in bad {
            assert!(validate(&schema, v).is_err(), "{schema} should reject {v}");
        }
    }

    #[test]
    fn json_valid_reads_fenced_blocks() {
        let f = from_config("json_valid", &json!(null)).unwrap();
        let c = cols(json!({}));
        assert_eq!(score(&*f, r#" {"a": [1, 2]} "#, &c), 1.0);
        assert_eq!(
            score(&*f, "Here you go:\n```json\n{\"a\": 1}\n```\nDone.", &c),
            1.0
        );
        assert_eq!(score(&*f, "```python\nx = 1\n```\n```JSON\n[true]\n```", &c), 1.0);
        assert_eq!(score(&*f, "Here you go: {\"a\": 1}", &c), 0.0);
        assert_eq!(score(&*f, "```json\n{\"a\": }\n```", &c), 0.0);
        assert_eq!(score(&*f, "{'a': 1}", &c), 0.0);
        assert_eq!(score(&*f, "", &c), 0.0);
    }

    #[test]
    fn type_keyword() {
        check(
            json!({"type": "integer"}),
            &[json!(3), json!(-7), json!(2.0)],
            &[json!(2.5), json!("3"), json!(null)],
        );
        check(
            json!({"type": "number"}),
            &[json!(3), json!(2.5)],
            &[json!("2.5"), json!(true)],
        );
        check(
            json!({"type": ["string", "null"]}),
            &[json!("a"), json!(null)],
            &[json!(1), json!([])],
        );
        check(json!({"type": "object"}), &[json!({})], &[json!([]), json!("{}")]);
        check(json!({"type": "array"}), &[json!([])], &[json!({})]);
        check(json!({"type": "boolean"}), &[json!(false)], &[json!(0)]);
        assert!(check_schema(&json!({"type": "int"})).is_err());
    }

    #[test]
    fn object_keywords() {
        let schema = json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name"],
            "additionalProperties": false
        });
        check(
            schema,
            &[json!({"name": "Ada"}), json!({"name": "Ada", "age": 36})],
            &[
                json!({"age": 36}),
                json!({"name": 1}),
                json!({"name": "Ada", "age": -1}),
                json!({"name": "Ada", "x": 1}),
            ],
        );
        check(
            json!({"properties": {"a": {}}, "additionalProperties": {"type": "number"}}),
            &[json!({"a": "s", "b": 1}), json!([1])],
            &[json!({"a": "s", "b": "t"})],
        );
        check(
            json!({"patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": false}),
            &[json!({"x_a": 1})],
            &[json!({"x_a": "1"}), json!({"y": 1})],
        );
        check(
            json!({"minProperties": 1, "maxProperties": 2}),
            &[json!({"a": 1})],
            &[json!({}), json!({"a": 1, "b": 2, "c": 3})],
        );
    }

    #[test]
    fn array_keywords() {
        check(
            json!({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}),
            &[json!(["a"]), json!(["a", "b"])],
            &[json!([]), json!(["a", "b", "c"]), json!(["a", 1])],
        );
        check(
            json!({"items": [{"type": "integer"}, {"type": "string"}]}),
            &[json!([1, "a"]), json!([1])],
            &[json!(["a", 1])],
        );
        check(json!({"uniqueItems": true}), &[json!([1, 2])], &[json!([1, 1.0])]);
    }

    #[test]
    fn value_keywords() {
        check(
            json!({"enum": ["red", 1, null]}),
            &[json!("red"), json!(1.0), json!(null)],
            &[json!("blue"), json!(2)],
        );
        check(
            json!({"const": {"a": [1]}}),
            &[json!({"a": [1]})],
            &[json!({"a": [2]}), json!({"a": [1], "b": 0})],
        );
        check(
            json!({"minimum": 1, "maximum": 3}),
            &[json!(1), json!(3), json!("x")],
            &[json!(0.5), json!(3.5)],
        );
        check(
            json!({"exclusiveMinimum": 1, "exclusiveMaximum": 3}),
            &[json!(2)],
            &[json!(1), json!(3)],
        );
        check(
            json!({"minimum": 1, "exclusiveMinimum": true}),
            &[json!(1.5)],
            &[json!(1)],
        );
        check(json!({"multipleOf": 0.5}), &[json!(1.5), json!(2)], &[json!(1.2)]);
        check(
            json!({"minLength": 2, "maxLength": 3}),
            &[json!("ab"), json!("éèê")],
            &[json!("a"), json!("abcd")],
        );
        check(
            json!({"pattern": "^[a-z]+\\d$"}),
            &[json!("abc1")],
            &[json!("Abc1"), json!("abc")],
        );
        check(json!({"pattern": "\\d"}), &[json!("a1b")], &[json!("ab")]);
        assert!(check_schema(&json!({"properties": {"a": {"pattern": "("}}})).is_err());
    }

    #[test]
    fn combinators() {
        check(
            json!({"allOf": [{"type": "integer"}, {"minimum": 2}]}),
            &[json!(2)],
            &[json!(1), json!(2.5)],
        );
        check(
            json!({"anyOf": [{"type": "string"}, {"minimum": 2}]}),
            &[json!("a"), json!(3)],
            &[json!(1)],
        );
        check(
            json!({"oneOf": [{"type": "integer"}, {"minimum": 2}]}),
            &[json!(1), json!(2.5)],
            &[json!(3), json!(1.5)],
        );
        check(json!({"not": {"type": "null"}}), &[json!(0)], &[json!(null)]);
        check(json!(true), &[json!(1)], &[]);
        check(json!(false), &[], &[json!(1)]);
        // unknown keywords are ignored
        check(
            json!({"$ref": "#/x", "format": "email", "type": "string"}),
            &[json!("not an email")],
            &[json!(1)],
        );
    }

    #[test]
    fn json_schema_from_option_or_column() {
        let f = from_config(
            "json_schema",
            &json!({"schema": {"type": "object", "required": ["a"]}}),
        )
        .unwrap();
        let c = cols(json!({}));
        assert_eq!(score(&*f, "```json\n{\"a\": 1}\n```", &c), 1.0);
        assert_eq!(score(&*f, "{\"b\": 1}", &c), 0.0);
        assert_eq!(score(&*f, "not json", &c), 0.0);

        let f = from_config("json_schema", &json!(null)).unwrap();
        let c = cols(json!({"schema": "{\"type\": \"array\", \"maxItems\": 1}"}));
        assert_eq!(score(&*f, "[1]", &c), 1.0);
        assert_eq!(score(&*f, "[1, 2]", &c), 0.0);
        let c = cols(json!({"schema": {"type": "string"}}));
        assert_eq!(score(&*f, "\"x\"", &c), 1.0);
        let e = f
            .score(&Sample {
                prompt: "",
                completion: "1",
                columns: &cols(json!({})),
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "json_schema: column `schema` is missing");

        let e = from_config("json_schema", &json!({"schema": {"pattern": "("}}))
            .err()
            .unwrap();
        assert!(
            e.starts_with("json_schema: option `schema` is not a valid schema"),
            "{e}"
        );
        let e = from_config("json_schema", &json!({"schema": 3})).err().unwrap();
        assert!(e.starts_with("json_schema: option `schema`"), "{e}");
    }
}
